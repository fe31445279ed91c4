r"""Overlay the curves of runs from different work directories in one plot, e.g. the same
recipe on one device and on a mesh:

    python -m experiments.overlay --key=val_loss --out=experiments/results/distributed_cpu/val_loss.png \
        --runs="nvfp4 1 device=experiments/results/gpt_fp4_stdlib_seeds/nvfp4;nvfp4 data:8 fp8=experiments/results/gpt_fp4_stdlib_data8_fp8_e4m3/nvfp4"

Each run is ``label=<run directory>`` (the directory holding ``metrics.jsonl``, or a
``--seeds`` run's directory holding ``seed_<s>/metrics.jsonl``), separated by ``;``. A run
of several seeds is drawn as its mean with a ± one standard deviation band. Also prints
each run's last value of ``--key`` (mean ± std over its seeds).
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common
from experiments import seeds as seeds_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("runs", None, "';'-separated label=<run directory> pairs", required=True)
  flags.DEFINE_string("key", "val_loss", "the metric to plot")
  flags.DEFINE_enum("kind", "eval", ["eval", "train"], "which records hold the metric")
  flags.DEFINE_string("out", None, "PNG path", required=True)
  flags.DEFINE_string("title", None, "plot title (default: the metric)")


def parse_runs(spec: str) -> dict[str, list[str]]:
  """``"a=dir1;b=dir2"`` -> ``{"a": [dir1's seed directories], ...}``; each directory must
  hold a ``metrics.jsonl`` or ``seed_<s>/metrics.jsonl`` directories."""
  runs = {}
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    label, sep, path = part.partition("=")
    if not sep or not label.strip() or not path.strip():
      raise ValueError(f"--runs entry {part!r} must be label=<run directory>")
    path = path.strip()
    dirs = seeds_lib.seed_dirs(path)
    if not dirs:
      raise ValueError(f"--runs: {path} has no metrics.jsonl nor seed_<s>/metrics.jsonl "
                       "(pass a run's directory, e.g. <workdir>/<run>)")
    if label.strip() in runs:
      raise ValueError(f"--runs repeats the label {label.strip()!r}")
    runs[label.strip()] = dirs
  if not runs:
    raise ValueError("--runs is empty")
  return runs


def main(argv):
  del argv
  try:
    runs = parse_runs(FLAGS.runs)
  except ValueError as e:
    raise app.UsageError(str(e))
  hist = {label: [common.MetricsLog(os.path.join(d, "metrics.jsonl")).read() for d in dirs]
          for label, dirs in runs.items()}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  common.plot_curves(hist, FLAGS.key, FLAGS.out, FLAGS.title or FLAGS.key, kind=FLAGS.kind)
  for label, logs in hist.items():
    stat = seeds_lib.Stat.of(common.last(recs, FLAGS.kind, FLAGS.key) for recs in logs)
    value = "none" if stat is None else stat.format()
    seeds = f" ({stat.n} seeds)" if stat is not None and stat.n > 1 else ""
    print(f"{label}: {FLAGS.key} {value}{seeds}")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  common.run_main(main)
