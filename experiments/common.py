"""What every experiment script shares: its work directory, metrics log, progress line,
checkpoints with bit-exact resume, Ctrl-C handling, plots and the closing summary.

A work directory holds::

    config.json          every flag, fp4jax / jax / flax versions, the device
    <run>/metrics.jsonl  one JSON object per logged step (train) or evaluation (eval)
    <run>/checkpoints/   orbax checkpoints (fp4jax.checkpoint)
    <run>/final.json     the run's final metrics
    *.png                plots (matplotlib, Agg backend)
    summary.md           the closing table: final metrics per run, gaps to the baseline
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import fp4jax
from fp4jax import blocks, dispatch, distributed
from fp4jax import recipes as recipes_lib
from experiments import seeds as seeds_lib


TRAINING_FLAGS = ("steps", "batch_size", "lr", "weight_decay", "warmup", "seed", "seeds",
                  "switch_recipe", "switch_at", "report_only", "eval_every",
                  "log_every", "checkpoint_every", "workdir", "resume", "stop_at", "dtype",
                  "impl", "mesh", "grad_comm", "spmd", "coordinator_address", "num_processes",
                  "process_id", "tensorboard")


def define_training_flags(*, workdir: str, steps: int, batch_size: int, batch_what: str,
                          lr: float, weight_decay: float, warmup: int, eval_every: int,
                          log_every: int, checkpoint_every: int) -> None:
  """The absl flags every experiment has, with its defaults. Experiments define their
  flags in ``define_flags()`` called under ``__main__``, so importing two experiments (as
  the tests do) defines nothing twice."""
  from absl import flags
  flags.DEFINE_integer("steps", steps, "training steps per run", lower_bound=1)
  flags.DEFINE_integer("batch_size", batch_size, f"{batch_what} per step", lower_bound=1)
  flags.DEFINE_float("lr", lr, "peak learning rate (AdamW, linear warmup, cosine decay)")
  flags.register_validator("lr", lambda v: v > 0 and math.isfinite(v),
                           "--lr must be a positive finite learning rate, e.g. --lr=1e-3")
  flags.DEFINE_float("weight_decay", weight_decay, "AdamW weight decay", lower_bound=0.0)
  flags.DEFINE_integer("warmup", warmup, "warmup steps", lower_bound=0)
  flags.DEFINE_integer("seed", 0, "initialisation, data order and quantization keys",
                       lower_bound=0)
  flags.DEFINE_list("seeds", None, "repeat every run per seed: a count (--seeds=3: --seed to "
                    "--seed+2) or a list (--seeds=0,4,7); each seed in <run>/seed_<s>/, the "
                    "summary with mean ± std over seeds and gaps paired by seed")
  flags.register_validator("seeds", _seeds_ok, "--seeds must be a count (--seeds=3) or a "
                           "list of distinct integer seeds (--seeds=0,4,7)")
  flags.DEFINE_bool("report_only", False, "train nothing: write the summary, final.json and "
                    "plots from the runs' final.json files in --workdir (e.g. after training "
                    "the runs in parallel processes, one --compare each)")
  flags.DEFINE_string("switch_recipe", None, "precision schedule: every run not already in "
                      "this recipe switches to it at --switch_at (e.g. bf16; per run: "
                      "<run>+then_<recipe>@<at>)")
  flags.DEFINE_string("switch_at", None, "where --switch_recipe starts: a fraction of the "
                      "steps (0.8) or a step (480)")
  flags.DEFINE_integer("eval_every", eval_every, "evaluate every this many steps",
                       lower_bound=1)
  flags.DEFINE_integer("log_every", log_every, "log train metrics every this many steps",
                       lower_bound=1)
  flags.DEFINE_integer("checkpoint_every", checkpoint_every, "checkpoint every this many steps",
                       lower_bound=1)
  flags.DEFINE_string("workdir", workdir, "output directory")
  register_directory_validator("workdir")
  flags.DEFINE_bool("resume", False, "continue each run from its last checkpoint")
  flags.DEFINE_integer("stop_at", None, "stop each run at this step with a checkpoint, as "
                       "Ctrl-C does (for time-limited sessions); continue with --resume",
                       lower_bound=1)
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                    "compute dtype (auto: bfloat16 on GPU, float32 on CPU)")
  flags.DEFINE_string("impl", "auto", "GEMM implementation (fp4jax.gemm_impl: auto, xla, "
                      "pallas)")
  flags.DEFINE_string("mesh", None, "device mesh over axes data and fsdp, e.g. 'data:2' "
                      "(data parallel), 'data:2,fsdp:4' (FSDP inside, data parallel across), "
                      "'fsdp:-1' (all devices); default: one device, no sharding")
  flags.DEFINE_enum("grad_comm", "f32", list(distributed.GRAD_COMMS),
                    "gradient communication over the mesh's data axis: f32 (XLA's all-reduce) "
                    "or FP8 codes with a shared power-of-two scale (FP8-LM / the Microsoft FP4 "
                    "recipe)")
  flags.DEFINE_enum("spmd", "auto", ["auto", "partitioner", "shard_map"],
                    "with --mesh, where gradients come from: XLA's partitioner on global "
                    "tensors, or an explicit per-device data-parallel region (auto: shard_map "
                    "for FP8 gradients or Pallas kernels on several GPUs)")
  flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0 "
                      "(jax.distributed.initialize; SLURM / Open MPI launches are detected)")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
  flags.DEFINE_bool("tensorboard", False, "also write TensorBoard event files to "
                    "<run>/tensorboard (needs tensorboardX: pip install tensorboardX); the "
                    "JSONL log stays the record")


def _seeds_ok(value) -> bool:
  try:
    seeds_lib.parse_seeds(value, 0)
  except ValueError:
    return False
  return True


def writable_directory_problem(path: str) -> str | None:
  """Why ``path`` cannot be (or become) a directory this process writes into, or None.

  Checked at flag-parse time, so a bad ``--workdir`` is a one-line usage error before any
  work rather than a ``FileExistsError`` / ``PermissionError`` traceback after it."""
  if not path:
    return "is empty; give an output directory, e.g. --workdir=runs/mine"
  probe = os.path.abspath(path)
  if os.path.exists(probe) and not os.path.isdir(probe):
    return f"{path!r} is a file, not a directory; give a directory"
  while not os.path.exists(probe):          # the nearest existing ancestor gets the writes
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if not os.path.isdir(probe):
    return f"{path!r} lies under {probe!r}, which is a file; give a directory"
  if not os.access(probe, os.W_OK | os.X_OK):
    return (f"{path!r} is not writable ({probe!r} does not allow this user to write); give "
            "a directory you can write to")
  return None


def register_directory_validator(flag: str) -> None:
  """An absl validator: ``--<flag>`` must be a directory this process can write (or
  create)."""
  from absl import flags

  def check(value):
    problem = writable_directory_problem(value)
    if problem:
      raise flags.ValidationError(f"--{flag} {problem}")
    return True

  flags.register_validator(flag, check)


def run_main(main: Callable) -> None:
  """``absl.app.run(main)``, with a :class:`absl.app.UsageError` from ``main`` printed as
  one line and a hint (absl would print the whole help first); exit status 2."""
  from absl import app

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      print(f"{os.path.basename(sys.argv[0])}: error: {e}\nTry --help for the flags.",
            file=sys.stderr, flush=True)
      sys.exit(2)
    except NonFiniteLoss as e:
      print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
      sys.exit(3)

  app.run(wrapped)


def device_description() -> str:
  d = jax.devices()[0]
  hosts = f", {jax.process_count()} hosts" if jax.process_count() > 1 else ""
  return f"{d.platform}:{d.device_kind} x{jax.device_count()}{hosts}"


def is_chief() -> bool:
  """Process 0 writes the logs, plots and summaries (every process saves its shards of a
  checkpoint through orbax)."""
  return jax.process_index() == 0


def write_config(workdir: str, flag_values: dict[str, Any], **extra) -> dict:
  """``workdir/config.json``: the flags, library versions and device."""
  import flax
  import optax
  cfg = {"flags": flag_values, "fp4jax": getattr(fp4jax, "__version__", "0"),
         "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
         "python": platform.python_version(), "device": device_description(),
         "argv": sys.argv, **extra}
  if is_chief():
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg, f, indent=1, default=str)
  return cfg


def flag_dict(flags_module, names: Iterable[str]) -> dict[str, Any]:
  return {n: flags_module.FLAGS[n].value for n in names}


def script_flag_values() -> dict[str, Any]:
  """Every key flag of the running script (``__main__``: its own flags and, adopted, the
  training flags of this module), name -> value: what ``config.json`` records, derived
  from the flags themselves so that a new flag cannot drop out."""
  from absl import flags
  main = sys.modules["__main__"]
  return {f.name: f.value for f in sorted(flags.FLAGS.get_key_flags_for_module(main),
                                          key=lambda f: f.name)}


def tensorboard_writer(logdir: str, purge_step: int | None = None):
  """A ``tensorboardX.SummaryWriter`` for ``logdir``, or None (with one printed line) when
  tensorboardX is not installed: event files are optional, the JSONL log is the record.
  ``purge_step``: a resumed run's start, so events after it (from the interrupted run)
  are dropped as the JSONL log's are."""
  try:
    import tensorboardX
  except ImportError:
    print("--tensorboard: tensorboardX is not installed (pip install tensorboardX); "
          "writing the JSONL log only", flush=True)
    return None
  if purge_step:
    return tensorboardX.SummaryWriter(logdir, purge_step=purge_step)
  return tensorboardX.SummaryWriter(logdir)


class MetricsLog:
  """Appends JSON lines to ``path``; :meth:`truncate` drops entries after a step, so a
  resumed run's log equals an uninterrupted run's. With ``tensorboard_dir`` every scalar
  also goes to TensorBoard as ``<kind>/<name>`` (:func:`tensorboard_writer`)."""

  def __init__(self, path: str, tensorboard_dir: str | None = None,
               purge_step: int | None = None):
    self.path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self.tb = (tensorboard_writer(tensorboard_dir, purge_step)
               if tensorboard_dir and is_chief() else None)

  def write(self, record: dict[str, Any]) -> None:
    if not is_chief():
      return
    clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) and
                 np.ndim(v) == 0 else v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean) + "\n")
    if self.tb is not None and "step" in clean:
      for k, v in clean.items():
        if k not in ("step", "kind") and isinstance(v, (int, float)):
          self.tb.add_scalar(f"{clean.get('kind', 'metrics')}/{k}", v, int(clean["step"]))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()

  def read(self) -> list[dict[str, Any]]:
    """The records. A last line without its newline is a write the process did not finish
    (it was killed): it is left out; any other unreadable line is an error."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      lines = f.read().split("\n")
    # split leaves "" after the final newline, or the torn tail of an unfinished write.
    return [json.loads(line) for line in lines[:-1] if line.strip()]

  def truncate(self, after_step: int) -> None:
    """Keeps the records up to ``after_step`` (a resumed run's checkpoint). Written to a
    temporary file and renamed over the log, so a kill during it loses nothing."""
    if not is_chief():
      return
    keep = [r for r in self.read() if r.get("step", 0) <= after_step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)


# (i, n): the run train_runs is on, 1-based, and how many there are (progress lines).
RUN_POSITION = contextvars.ContextVar("experiments_run_position", default=(1, 1))


class Progress:
  """One line per call: run i of N, step, loss, throughput, this run's ETA and, with
  several runs, the whole command's (the remaining runs assumed as long as this one)."""

  def __init__(self, total_steps: int, examples_per_step: int, label: str = ""):
    self.total, self.per_step, self.label = total_steps, examples_per_step, label
    self.t0, self.s0 = None, None
    self.run, self.runs = RUN_POSITION.get()

  def __call__(self, step: int, **metrics) -> str:
    now = time.perf_counter()
    if self.t0 is None:  # the first call includes compilation: time from here
      self.t0, self.s0 = now, step
    done, elapsed = step - self.s0, now - self.t0
    rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
    eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
    where = f" run {self.run}/{self.runs}" if self.runs > 1 else ""
    parts = [f"{self.label}{where} step {step}/{self.total}"]
    parts += [f"{k} {v:.4f}" for k, v in metrics.items()]
    if rate == rate:
      parts += [f"{rate:.1f} steps/s ({rate * self.per_step:.0f} ex/s)",
                f"ETA {eta:.0f}s" if math.isfinite(eta) else "ETA ?"]
      if self.runs > self.run and math.isfinite(eta):
        parts.append(f"all runs ~{eta + (self.runs - self.run) * self.total / rate:.0f}s")
    line = " | ".join(parts)
    print(line, flush=True)
    return line


class StopRequested:
  """Turns Ctrl-C (SIGINT) into a flag the training loop checks between steps, so the run
  saves a checkpoint and exits cleanly; a second Ctrl-C interrupts at once."""

  def __init__(self):
    self.requested = False

  def _handler(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

  @contextlib.contextmanager
  def installed(self):
    try:
      old = signal.signal(signal.SIGINT, self._handler)
    except ValueError:  # not the main thread: leave SIGINT alone
      yield self
      return
    try:
      yield self
    finally:
      signal.signal(signal.SIGINT, old)


def train_runs(runs: Sequence[Any], prepare: Callable,
               seeds: Sequence[int] = (0,)) -> tuple[dict[str, list[dict]], bool]:
  """Every run (anything with a ``name``) for every seed, run-major.

  ``prepare(run)`` builds what a run's seeds share (its model, optimizer and jitted steps,
  so a second seed reuses the first one's compilation) and returns
  ``train_seed(seed, stop) -> final metrics``. Stops after a seed that Ctrl-C
  interrupted. Returns ({run name: the finished seeds' final metrics}, whether Ctrl-C
  stopped us)."""
  stop = StopRequested()
  finals: dict[str, list[dict]] = {}
  total = len(runs) * len(seeds)
  with stop.installed():
    for i, r in enumerate(runs):
      train_seed = prepare(r)
      for j, seed in enumerate(seeds):
        token = RUN_POSITION.set((i * len(seeds) + j + 1, total))
        try:
          finals.setdefault(r.name, []).append(train_seed(seed, stop))
        finally:
          RUN_POSITION.reset(token)
        if stop.requested:
          return finals, True
  return finals, False


def read_finals(workdir: str, runs: Sequence[str], seeds: Sequence[int],
                seeded: bool) -> dict[str, list[dict]]:
  """{run: its seeds' final.json} as :func:`train_runs` returns them, read back from
  ``workdir`` (``--report_only``); a missing file is an error naming it."""
  finals: dict[str, list[dict]] = {}
  for run in runs:
    for seed in seeds:
      path = os.path.join(seeds_lib.run_dir(workdir, run, seed, seeded), "final.json")
      if not os.path.exists(path):
        raise ValueError(f"--report_only: {path} does not exist (run {run!r}"
                         f"{f' seed {seed}' if seeded else ''} has not been trained in "
                         f"{workdir}); train it first, without --report_only")
      with open(path) as f:
        finals.setdefault(run, []).append(json.load(f))
  return finals


def train_or_read(runs: Sequence[Any], prepare: Callable, seeds: Sequence[int],
                  seeded: bool, workdir: str, report_only: bool
                  ) -> tuple[dict[str, list[dict]], bool]:
  """:func:`train_runs`, or with ``--report_only`` :func:`read_finals` (nothing trained);
  a missing run under ``--report_only`` is an :class:`absl.app.UsageError`."""
  if not report_only:
    return train_runs(runs, prepare, seeds)
  from absl import app
  try:
    return read_finals(workdir, [r.name for r in runs], seeds, seeded), False
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def run_label(run: str, seed: int, seeded: bool) -> str:
  """A run's name in progress lines and messages: ``nvfp4``, or ``nvfp4/seed_1``."""
  return f"{run}/{seeds_lib.SEED_DIR_PREFIX}{seed}" if seeded else run


def read_histories(workdir: str, finals: dict[str, list[dict]],
                   seeded: bool) -> dict[str, list[list[dict]]]:
  """{run: one metrics log per seed} for the seeds in ``finals`` (not whatever seed
  directories an earlier command left under ``workdir``)."""
  return {r: [MetricsLog(os.path.join(seeds_lib.run_dir(workdir, r, f["seed"], seeded),
                                      "metrics.jsonl")).read() for f in per_seed]
          for r, per_seed in finals.items()}


def curve(histories: Sequence[list[dict[str, Any]]], key: str, kind: str = "eval"
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(steps, mean, std, seeds) of ``key`` over several seeds' logs: at each step the
  seeds that logged it (an interrupted seed stops contributing where its log ends); std
  is the sample standard deviation (0 where one seed has the step)."""
  values: dict[int, list[float]] = {}
  for records in histories:
    for r in records:
      if r.get("kind") == kind and r.get(key) is not None:
        values.setdefault(int(r["step"]), []).append(float(r[key]))
  steps = np.array(sorted(values), dtype=np.int64)
  per = [np.array(values[s]) for s in steps]
  mean = np.array([v.mean() for v in per])
  std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in per])
  return steps, mean, std, np.array([len(v) for v in per])


def plot_curves(runs: dict[str, Sequence[list[dict[str, Any]]]], key: str, path: str,
                title: str, kind: str = "eval", ylabel: str | None = None,
                logy: bool = False) -> str:
  """One line per run of ``key`` against step, from the runs' ``kind`` records.

  ``runs``: {label: the metrics logs of its seeds}. With several seeds the line is the
  mean and the band the mean ± one standard deviation over the seeds."""
  if not is_chief():
    return path
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  banded = False
  for name, histories in runs.items():
    steps, mean, std, n = curve(histories, key, kind)
    if not len(steps):
      continue
    label = name if n.max() < 2 else f"{name} ({n.max()} seeds)"
    line, = ax.plot(steps, mean, label=label, lw=1.4)
    if n.max() > 1:
      banded = True
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
  ax.set_xlabel("step")
  ax.set_ylabel((ylabel or key) + (" (mean ± std over seeds)" if banded else ""))
  if logy:
    ax.set_yscale("log")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  def fmt(v):
    if isinstance(v, seeds_lib.Stat):
      return v.format()
    if isinstance(v, float):
      return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_summary(workdir: str, title: str, rows: Sequence[dict[str, Any]],
                  columns: Sequence[str], notes: str = "", plots: Sequence[str] = ()) -> str:
  """``workdir/summary.md``; also printed, then its full path. ``plots``: the figures
  the script may have written; the summary names those that exist."""
  text = f"# {title}\n\n{markdown_table(rows, columns)}\n"
  written = [p for p in plots if os.path.exists(os.path.join(workdir, p))]
  if written:
    notes = (notes + " " if notes else "") + f"Plots: {', '.join(written)}."
  if notes:
    text += f"\n{notes}\n"
  if not is_chief():
    return text
  path = os.path.abspath(os.path.join(workdir, "summary.md"))
  with open(path, "w") as f:
    f.write(text)
  print(text, flush=True)
  print(f"summary: {path}", flush=True)
  return text


def seed_rows(finals: dict[str, list[dict[str, Any]]], metrics: Sequence[str],
              gaps: Sequence[tuple[str, str, Callable[[str], str | None]]] = ()
              ) -> list[dict[str, Any]]:
  """One summary row per run from its seeds' final metrics (:func:`seeds.aggregate`):
  ``metrics`` become mean ± std over the seeds; each ``(column, metric, baseline)`` of
  ``gaps`` adds ``column``, the run's ``metric`` minus that of the run
  ``baseline(run name)`` (None: no such column for this run), paired by seed."""
  rows = []
  for name, per_seed in finals.items():
    done = finished(per_seed)
    row = seeds_lib.aggregate(done or per_seed, metrics)
    if done and len(done) < len(per_seed):
      row["seeds"] = f"{len(done)} (+{len(per_seed) - len(done)} unfinished, left out)"
    for column, metric, baseline in gaps:
      base = baseline(name)
      if base is not None and base in finals:
        row[column] = seeds_lib.paired_gap(done or per_seed,
                                           finished(finals[base]) or finals[base], metric)
    rows.append(row)
  return rows


def finished(per_seed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The seeds that trained to the end (not stopped by Ctrl-C or --stop_at): the ones the
  statistics use, so a run stopped early never averages in with finished ones (a run with
  no finished seed is summarised as it stands)."""
  return [f for f in per_seed if not f.get("interrupted")]


def write_finals(workdir: str, finals: dict[str, list[dict[str, Any]]],
                 rows: Sequence[dict[str, Any]]) -> str:
  """``workdir/final.json``: every run's per-seed final metrics and its summary row
  (means, standard deviations, paired gaps with their 95% intervals)."""
  path = os.path.join(workdir, "final.json")
  if is_chief():
    out = {"runs": [{"run": name, "per_seed": per_seed, "summary": seeds_lib.to_json(row)}
                    for (name, per_seed), row in zip(finals.items(), rows)]}
    with open(path, "w") as f:
      json.dump(out, f, indent=1)
  return path


def seeds_phrase(seeds: Sequence[int], seeded: bool) -> str:
  """``seed 0`` or ``3 seeds (0, 1, 2)``, for titles."""
  if not seeded:
    return f"seed {seeds[0]}"
  return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def seeds_note(seeded: bool) -> str:
  """The summary's sentence on what ± means (:mod:`experiments.seeds`)."""
  if not seeded:
    return "One seed: rerun with --seeds=3 for run-to-run noise."
  return ("Cells are mean ± sample standard deviation over the seeds; gaps are paired by "
          "seed, and * marks a gap whose 95% Student-t interval excludes zero (a "
          "difference beyond the run-to-run noise).")


def first_run_with_recipe(finals: dict[str, list[dict[str, Any]]], recipe: str) -> str | None:
  """The name of the first run whose recipe is ``recipe`` (the baseline of the gaps)."""
  return next((name for name, per_seed in finals.items()
               if per_seed and per_seed[0].get("recipe") == recipe), None)


def base_run(name: str, names: Iterable[str]) -> str | None:
  """The run of ``names`` that ``name`` extends by ``+options`` (the longest such name),
  or None: what an ablation or a precision switch is compared with
  (``nvfp4+nohad`` -> ``nvfp4``; ``tetrajet+qema+then_bf16@0.8`` -> ``tetrajet+qema``
  if that run is there, else ``tetrajet``)."""
  parts, present = name.split("+"), set(names)
  for n in range(len(parts) - 1, 0, -1):
    candidate = "+".join(parts[:n])
    if candidate in present:
      return candidate
  return None


class SwitchSpec(NamedTuple):
  """A precision schedule: train with the run's recipe, then from step ``at`` to the end
  with ``recipe`` (NVIDIA, "Pretraining Large Language Models with NVFP4", arXiv
  2509.25149, Sec. 5: switching the last part of training to higher precision recovers
  most of the remaining loss gap). ``at`` as written: a fraction of the steps (``0.8``) or
  a step (``480``). In a run name: ``<run>+then_<recipe>@<at>``."""
  recipe: str
  at: str

  @property
  def option(self) -> str:
    return f"{SWITCH_OPTION}{self.recipe}@{self.at}"

  def step(self, steps: int) -> int:
    """The number of steps trained before the switch, validated against ``steps``."""
    text = self.at.strip()
    try:
      if any(c in text for c in ".eE"):
        frac = float(text)
        if not 0.0 < frac < 1.0:
          raise ValueError
        at = round(frac * steps)
      else:
        at = int(text)
    except ValueError:
      raise ValueError(f"switch at {self.at!r}: give a fraction of the steps strictly "
                       "between 0 and 1 (0.8) or a step (480)") from None
    if not 1 <= at < steps:
      raise ValueError(f"switch at {self.at!r} is step {at} of {steps}: the switch must "
                       f"leave steps on both sides (1 <= step <= {steps - 1})")
    return at


SWITCH_OPTION = "then_"


def split_switch(options: Sequence[str]) -> tuple[list[str], SwitchSpec | None]:
  """A run name's ``+options`` -> (the options that are not a switch, the switch)."""
  rest, found = [], []
  for o in options:
    if o.startswith(SWITCH_OPTION):
      recipe, sep, at = o[len(SWITCH_OPTION):].partition("@")
      if not sep or not recipe or not at:
        raise ValueError(f"run option {o!r}: a precision switch is "
                         f"+{SWITCH_OPTION}<recipe>@<fraction or step>, e.g. "
                         f"+{SWITCH_OPTION}bf16@0.8")
      found.append(SwitchSpec(recipe, at))
    else:
      rest.append(o)
  if len(found) > 1:
    raise ValueError(f"run options {list(options)} hold {len(found)} precision switches; "
                     "give one")
  return rest, (found[0] if found else None)


def with_switch_flags(names: Sequence[str], recipe: str | None, at: str | None) -> list[str]:
  """``--switch_recipe`` / ``--switch_at`` applied to run names: every quantized run
  whose recipe is not already ``recipe`` and which has no switch of its own gets
  ``+then_<recipe>@<at>`` (a BF16 run stays as it is: it is the baseline)."""
  if (recipe is None) != (at is None):
    raise ValueError("--switch_recipe and --switch_at go together, e.g. "
                     "--switch_recipe=bf16 --switch_at=0.8")
  if recipe is None:
    return list(names)
  out = []
  for n in names:
    parts = [p.strip() for p in n.split("+") if p.strip()]
    keep = not parts or parts[0] == recipe or split_switch(parts[1:])[1] is not None
    if not keep:
      try:
        keep = build_recipe(parts[0]).is_identity
      except ValueError:
        pass    # an unknown recipe: the run's parser names it
    out.append(n if keep else f"{n}+{SwitchSpec(recipe, at).option}")
  return out


class Phase(NamedTuple):
  """The second phase of a precision schedule (:class:`SwitchSpec`): once ``start`` steps
  are done, ``train_step`` and ``evaluate`` (of ``recipe``) replace the run's."""
  start: int
  recipe: str
  train_step: Callable
  evaluate: Callable


class LoopConfig(NamedTuple):
  """The step counts of :func:`train_loop` (from the experiment's flags)."""
  steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  resume: bool = False
  stop_at: int | None = None
  impl: str = "auto"
  examples_per_step: int = 1
  tensorboard: bool = False


class NonFiniteLoss(FloatingPointError):
  """A run's training loss (or, before a save, its state) became NaN or Inf; the message
  names the run, the first such step and the last checkpoint (from before it)."""


class NonFiniteWatch:
  """Remembers, on the device, the first step whose loss is not finite.

  ``update`` runs every step as one small asynchronous device computation (no host sync);
  ``check`` reads it (a sync) where the loop syncs anyway or must not go on: at log and
  eval steps and before every checkpoint save, so no checkpoint is ever written from
  parameters updated by a non-finite loss's gradients."""

  def __init__(self, name: str, last_saved: int | None = None):
    self.name, self.last_saved = name, last_saved
    self._first = (jnp.int32(-1), jnp.float32(0.0))   # (step, loss) of the first non-finite

  @staticmethod
  @jax.jit
  def _track(first, loss, step):
    first_step, first_loss = first
    new = (first_step < 0) & ~jnp.isfinite(loss)
    return (jnp.where(new, step, first_step).astype(jnp.int32),
            jnp.where(new, loss.astype(jnp.float32), first_loss))

  def update(self, loss, step: int) -> None:
    self._first = self._track(self._first, loss, jnp.int32(step))

  @staticmethod
  @jax.jit
  def _all_finite(state):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

  def check_state(self, state: Any, step: int) -> None:
    """Before a save: a finite loss can still come with non-finite gradients, whose update
    makes the parameters NaN/Inf; such a state is not saved either."""
    self.check(step)
    if bool(self._all_finite(state)):
      return
    kept = (f"the last checkpoint is step {self.last_saved}" if self.last_saved is not None
            else "no checkpoint was written")
    raise NonFiniteLoss(
        f"[{self.name}] the training state (parameters or optimizer state) is not finite at "
        f"step {step} although the loss was; stopped before saving it: {kept}. Lower --lr, "
        "clip gradients harder or train this recipe in higher precision")

  def check(self, step: int) -> None:
    first_step = int(self._first[0])
    if first_step < 0:
      return
    kept = (f"the last checkpoint is step {self.last_saved}, from before it (continue from it "
            "with --resume after changing the cause)" if self.last_saved is not None else
            "no checkpoint was written")
    raise NonFiniteLoss(
        f"[{self.name}] the training loss became {float(self._first[1])} at step "
        f"{first_step} (seen at step {step}); stopped: {kept}. Lower --lr or lengthen "
        "--warmup, or train this recipe in higher precision")


SECONDS_FILE = "train_seconds.json"   # {step: training seconds up to that checkpoint}


def _read_seconds(rdir: str, step: int) -> float:
  """The training seconds a resumed run had spent up to its checkpoint ``step`` (0 if
  unknown), so a run's ``seconds`` add up over the sessions that trained it."""
  try:
    with open(os.path.join(rdir, SECONDS_FILE)) as f:
      return float(json.load(f).get(str(step), 0.0))
  except (OSError, ValueError):
    return 0.0


def _write_seconds(rdir: str, step: int, seconds: float) -> None:
  if not is_chief():
    return
  path = os.path.join(rdir, SECONDS_FILE)
  try:
    with open(path) as f:
      table = {k: v for k, v in json.load(f).items() if int(k) < step}
  except (OSError, ValueError):
    table = {}
  table[str(step)] = seconds
  with open(path + ".tmp", "w") as f:
    json.dump(table, f)
  os.replace(path + ".tmp", path)


def train_loop(name: str, rdir: str, state: Any, train_step: Callable, get_batch: Callable,
               evaluate: Callable, cfg: LoopConfig, stop: StopRequested,
               switch: Phase | None = None) -> dict[str, Any]:
  """The training loop every experiment shares.

  Args:
    name: the run's name (progress and messages).
    rdir: the run's directory (``metrics.jsonl``, ``checkpoints/``).
    state: a NamedTuple with a scalar ``step`` field, freshly initialised (also the
      restore target).
    train_step: ``(state, *batch) -> (state, {metric: scalar})``, jitted; ``loss`` required.
    get_batch: ``step -> tuple of arrays``, a pure function of the step (so a resumed run
      sees the same data).
    evaluate: ``state -> {metric: float}``.
    switch: a precision schedule's second phase: from ``switch.start`` steps done on, its
      train step and evaluation are used (the state, optimizer and keys carry over). The
      switch is logged as ``{"kind": "switch", "step", "recipe"}``; a resumed run picks
      the phase from its step, so resuming on either side of the switch equals an
      uninterrupted run.
  Returns:
    ``{"state", "records", "interrupted", "seconds"}``. ``--resume`` restores the last
    checkpoint and truncates the log to it, so the log equals an uninterrupted run's;
    ``seconds`` counts the training time of every session up to the end.
  """
  log = MetricsLog(os.path.join(rdir, "metrics.jsonl"))
  ckpt_dir = os.path.join(rdir, "checkpoints")
  if not cfg.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir) and is_chief():
    # A fresh run starts over (its metrics log too, below); the Checkpointer refuses to
    # overwrite steps, so the earlier run's checkpoints go, and the user is told.
    print(f"[{name}] a fresh run (no --resume): replacing the earlier run's checkpoints in "
          f"{ckpt_dir}", flush=True)
    shutil.rmtree(ckpt_dir)
  ckpt = fp4jax.checkpoint.Checkpointer(ckpt_dir, max_to_keep=2)
  start = 0
  if cfg.resume and ckpt.latest_step() is None:
    print(f"[{name}] --resume: no checkpoint in {ckpt_dir} yet; starting from step 0",
          flush=True)
  if cfg.resume and ckpt.latest_step() is not None:
    state = type(state)(**ckpt.restore(state._asdict()))
    start = int(state.step)
    log.truncate(start)
    print(f"[{name}] resumed from step {start}", flush=True)
  elif os.path.exists(log.path) and is_chief():
    os.remove(log.path)  # a fresh run: no stale history
  if cfg.tensorboard:
    log = MetricsLog(log.path, os.path.join(rdir, "tensorboard"), purge_step=start)
  if not start and is_chief() and os.path.exists(os.path.join(rdir, SECONDS_FILE)):
    os.remove(os.path.join(rdir, SECONDS_FILE))
  earlier = _read_seconds(rdir, start) if start else 0.0
  switch_logged = switch is not None and any(r.get("kind") == "switch" for r in log.read())
  progress = Progress(cfg.steps, cfg.examples_per_step, f"[{name}]")
  t0, interrupted = time.perf_counter(), False
  watch = NonFiniteWatch(name, last_saved=start if start else None)
  try:
    for step in range(start, cfg.steps):
      batch = get_batch(step)
      switched = switch is not None and step >= switch.start
      if switched and not switch_logged:
        log.write({"kind": "switch", "step": switch.start, "recipe": switch.recipe})
        print(f"[{name}] step {switch.start}: switching to {switch.recipe} for the last "
              f"{cfg.steps - switch.start} steps", flush=True)
        switch_logged = True
      with fp4jax.gemm_impl(cfg.impl):
        state, m = (switch.train_step if switched else train_step)(state, *batch)
      done = step + 1
      watch.update(m["loss"], done)      # on device: no host sync per step
      if done % cfg.log_every == 0 or done == cfg.steps:
        watch.check(done)
        m = {k: float(v) for k, v in m.items()}
        log.write({"kind": "train", "step": done, **m})
        progress(done, **{k: m[k] for k in ("loss", "flip_rate") if k in m})
      if done % cfg.eval_every == 0 or done == cfg.steps:
        watch.check(done)
        with fp4jax.gemm_impl(cfg.impl):
          ev = (switch.evaluate if switched else evaluate)(state)
        log.write({"kind": "eval", "step": done, **ev})
        print(f"[{name}] step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in ev.items()),
              flush=True)
      at_stop = stop.requested or done == cfg.stop_at
      if done % cfg.checkpoint_every == 0 or done == cfg.steps or at_stop:
        # Never a checkpoint of parameters that followed a non-finite loss (or are not
        # finite themselves).
        watch.check_state(state, done)
        # Periodic saves write in the background (orbax copies the arrays to host before
        # returning, so the next step may reuse their buffers); the last one and a stop
        # wait, and close() waits for any still pending.
        ckpt.save(done, state._asdict(), wait=at_stop or done == cfg.steps)
        _write_seconds(rdir, done, earlier + time.perf_counter() - t0)
        watch.last_saved = done
      if at_stop:
        interrupted = True
        print(f"[{name}] stopped at step {done}; checkpoint saved: continue with --resume",
              flush=True)
        break
  finally:
    ckpt.close()      # pending background saves (all of good steps) finish; none is lost
    log.close()
  seconds = earlier + time.perf_counter() - t0   # a finished run restored: its own time
  return {"state": state, "records": log.read(), "interrupted": interrupted,
          "seconds": seconds}


def final_record(run: str, seed: int, recipe: str, switch: Phase | None, par: "Parallel",
                 out: dict[str, Any], **metrics) -> dict[str, Any]:
  """A seed's ``final.json``: what every experiment records (run, seed, recipe, the
  switch, devices, steps, last train loss, seconds) and the script's ``metrics``."""
  rec = out["records"]
  return {"run": run, "seed": seed, "recipe": recipe,
          "switch": None if switch is None else {"recipe": switch.recipe,
                                                 "at_step": switch.start},
          "devices": par.devices, "grad_comm": par.grad_comm,
          "steps": int(out["state"].step), "train_loss": last(rec, "train", "loss"),
          **metrics, "seconds": out["seconds"], "interrupted": out["interrupted"]}


def write_final(rdir: str, final: dict[str, Any]) -> dict[str, Any]:
  """``<rdir>/final.json`` (process 0); returns ``final``."""
  if is_chief():
    with open(os.path.join(rdir, "final.json"), "w") as f:
      json.dump(final, f, indent=1)
  return final


def last(records: Sequence[dict[str, Any]], kind: str, key: str) -> Any:
  """The newest ``key`` of the ``kind`` records, or None."""
  vals = [r[key] for r in records if r.get("kind") == kind and key in r]
  return vals[-1] if vals else None


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any
  key: jax.Array


class Parallel(NamedTuple):
  """How a run uses its devices (``--mesh``, ``--grad_comm``, ``--spmd``;
  :mod:`fp4jax.distributed`).

  Without ``--mesh`` (``mesh=None``) everything is exactly the one-device program: plain
  ``jax.jit``, batches as ``jnp`` arrays. With a mesh, the state is placed with FSDP
  shardings aligned to the recipe's blocks, batches are split over every mesh axis and
  the train step is jitted with those shardings. The gradient then comes either from
  XLA's partitioner (``partitioner``: quantization on the global tensors, bit-identical
  to one device; the collectives are XLA's) or from an explicit data-parallel region
  (``shard_map``: per-device gradients, averaged in FP32 or sent in FP8). ``--spmd=auto``
  takes ``shard_map`` when gradients travel in FP8 or when the GEMMs may run Pallas
  kernels on a multi-GPU mesh (XLA cannot split a Pallas call), else ``partitioner``.
  """
  mesh: Any = None
  alignment: int = 1
  grad_comm: str = "f32"
  manual: bool = False

  @classmethod
  def from_flags(cls, mesh: str | None, grad_comm: str, recipe: Any, spmd: str = "auto",
                 impl: str = "auto") -> "Parallel":
    if spmd not in ("auto", "partitioner", "shard_map"):
      raise ValueError(f"--spmd must be auto, partitioner or shard_map, got {spmd!r}")
    if mesh is None:
      if grad_comm != "f32":
        raise ValueError(f"--grad_comm={grad_comm} needs a --mesh of 2 or more devices, "
                         "e.g. --mesh=data:2")
      return cls()
    try:
      m = distributed.make_mesh(mesh)
    except ValueError as e:
      raise ValueError(f"--mesh={mesh}: {e}") from None
    if grad_comm != "f32":
      if m.devices.size < 2:
        raise ValueError(f"--grad_comm={grad_comm} needs a mesh of 2 or more devices; "
                         f"--mesh={mesh} has 1")
      if spmd == "partitioner":
        raise ValueError(f"--grad_comm={grad_comm} sends gradients from an explicit "
                         "data-parallel region: use --spmd=shard_map (or auto)")
    kernels = (dispatch.device_facts().on_gpu and impl != "xla" and m.devices.size > 1
               and not recipes_lib.get(recipe).is_identity)
    manual = spmd == "shard_map" or (spmd == "auto" and (grad_comm != "f32" or kernels))
    return cls(m, distributed.recipe_alignment(recipe), grad_comm, manual)

  @property
  def devices(self) -> int:
    return 1 if self.mesh is None else int(self.mesh.devices.size)

  def describe(self) -> str:
    if self.mesh is None:
      return "one device"
    axes = ",".join(f"{a}:{n}" for a, n in self.mesh.shape.items())
    how = "shard_map" if self.manual else "partitioner"
    return (f"mesh {axes}, blocks aligned to {self.alignment}, {how}, gradients "
            f"{self.grad_comm}")

  def check_batch(self, batch_size: int) -> None:
    """Every device gets whole examples. (Scale blocks along the tokens, the wgrad GEMM's
    contraction axis, may cross devices on the partitioner path: quantization there is
    defined on the global tensor, so XLA moves what it needs and the numbers do not
    change. Inside the FP8-communication region each device quantizes its own tokens, as a
    data-parallel worker does.)"""
    if self.mesh is None:
      return
    n = distributed.batch_size_multiple(self.mesh)
    if batch_size % n:
      raise ValueError(f"--batch_size={batch_size} does not split over the {n} devices of "
                       f"the mesh: pick a multiple of {n}")

  def value_and_grad(self, loss_fn: Callable, batch_argnums: Sequence[int],
                     key_argnum: int) -> Callable:
    """``jax.value_and_grad(loss_fn)``, or its explicit data-parallel form."""
    if self.mesh is None or not self.manual:
      return jax.value_and_grad(loss_fn)
    return distributed.data_parallel_value_and_grad(
        loss_fn, self.mesh, batch_argnums=batch_argnums, key_argnum=key_argnum,
        grad_comm=self.grad_comm)

  def place_state(self, state: Any) -> Any:
    if self.mesh is None:
      return state
    return distributed.place(state, self.state_shardings(state))

  def state_shardings(self, state: Any) -> Any:
    return distributed.state_shardings(state, self.mesh, self.alignment)

  def jit_train_step(self, step_fn: Callable, state: Any,
                     batch_ndims: Sequence[int]) -> Callable:
    """``jax.jit(step_fn)`` for ``step_fn(state, *batch) -> (state, metrics)``; with a
    mesh, the state keeps its shardings across steps (one executable for every step) and
    the batch arrays (of ranks ``batch_ndims``) are split along their first axis."""
    if self.mesh is None:
      return jax.jit(step_fn)
    st = self.state_shardings(state)
    bs = tuple(distributed.batch_sharding(self.mesh, nd) for nd in batch_ndims)
    return jax.jit(step_fn, in_shardings=(st, *bs),
                   out_shardings=(st, distributed.replicated(self.mesh)))

  def batch(self, arrays: Sequence[np.ndarray]) -> tuple[jax.Array, ...]:
    if self.mesh is None:
      return tuple(jnp.asarray(a) for a in arrays)
    return distributed.shard_batch(arrays, self.mesh)


def initialize_distributed(flag_values) -> bool:
  """``jax.distributed.initialize`` for multi-host launches (before any device use)."""
  return distributed.initialize_if_multihost(flag_values.coordinator_address,
                                             flag_values.num_processes,
                                             flag_values.process_id)


def compute_dtype(flag: str):
  """``auto``: bfloat16 on a GPU, float32 elsewhere (XLA:CPU is slow in bfloat16)."""
  if flag == "auto":
    return jnp.bfloat16 if dispatch.device_facts().on_gpu else jnp.float32
  return jnp.dtype(flag)


def _override(spec, block_size, scale_mode):
  if spec is None:
    return None
  if block_size is not None:
    spec = spec.with_block_size(block_size)  # the one meaning of a block size (fp4jax.spec)
  if scale_mode is not None:
    spec = spec.replace(scale_mode=scale_mode)
  return spec


OPERANDS = recipes_lib.OPERANDS


def check_widths_fit(recipe: recipes_lib.Recipe, widths: dict[str, int], model: str) -> None:
  """Every GEMM width of a model (``{"width": 384, "MLP width": 1536, ...}``) must hold
  whole blocks of every quantized operand (:func:`fp4jax.blocks.required_multiple`, the
  library's one alignment rule)."""
  for op in OPERANDS:
    spec = getattr(recipe, op)
    for axis in (-1, -2):
      blk = blocks.required_multiple(spec, axis)
      for what, n in widths.items():
        if n % blk:
          raise ValueError(f"block size {blk} of recipe {recipe.name!r} does not divide the "
                           f"{what} {n} of --model={model}: pass a --block_size that "
                           f"divides it, or another --model")


def build_recipe(name: str, block_size: int | None = None,
                 scale_mode: str | None = None) -> recipes_lib.Recipe:
  """The recipe a run name's first part selects, with block size / scale rule overrides."""
  if name in recipes_lib.RECIPES:
    r = recipes_lib.get(name)
  elif name in fp4jax.spec.PRESETS:
    s = fp4jax.get_spec(name)
    r = recipes_lib.Recipe(name, s, s, s, s, s, s, reference=f"{name} for all six operands")
  else:
    raise ValueError(f"unknown recipe or format {name!r}; recipes: "
                     f"{', '.join(sorted(recipes_lib.RECIPES))}; formats: "
                     f"{', '.join(sorted(fp4jax.spec.PRESETS))}")
  if block_size is None and scale_mode is None or r.is_identity:
    return r
  try:
    changes = {op: _override(getattr(r, op), block_size, scale_mode) for op in OPERANDS}
    tag = "".join([f"_b{block_size}" if block_size else "", f"_{scale_mode}" if scale_mode else ""])
    return r.replace(name=r.name + tag, **changes)
  except (ValueError, TypeError) as e:
    raise ValueError(f"recipe {name!r} with --block_size={block_size} "
                     f"--scale_mode={scale_mode}: {e}") from None


