r"""Seeds as an axis of every training experiment: which seeds a command runs, where each
seed's run lives, and the statistics over seeds that its summary reports.

``--seeds=N`` runs N seeds, ``--seed`` .. ``--seed + N - 1``; ``--seeds=0,4,7`` runs those.
A seed sets a run's whole randomness: model initialisation, data order and the
stochastic-rounding keys. Without ``--seeds`` a command runs the one seed ``--seed`` in
the layout it always had (``<workdir>/<run>/``); with it every seed gets its own directory
``<workdir>/<run>/seed_<s>/`` (log, checkpoints, final.json, each resumed on its own).

Statistics. For a metric with values :math:`x_1..x_n` over seeds the summary reports the
mean :math:`\bar x` and the sample standard deviation :math:`s = \sqrt{\sum (x_i - \bar
x)^2 / (n - 1)}`. A gap to a baseline is paired by seed, :math:`d_i = x_i - b_i` (both
runs share seed i's data order), which removes the noise the two runs share. A gap is
marked as exceeding the noise when the two-sided 95% Student-t interval
:math:`\bar d \pm t_{0.975, n-1}\, s_d / \sqrt n` excludes zero (with n = 3 that needs
:math:`|\bar d| > 2.48\, s_d`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, NamedTuple, Sequence

SEED_DIR_PREFIX = "seed_"
CONFIDENCE = 0.95


def parse_seeds(values: Sequence[str] | None, seed: int) -> list[int] | None:
  """``--seeds`` (absl list flag) and ``--seed`` -> the seeds to run, or None (one seed,
  ``--seed``, in the unseeded layout).

  ``["3"]`` -> ``[seed, seed + 1, seed + 2]``; ``["0", "4", "7"]`` -> ``[0, 4, 7]``."""
  if values is None:
    return None
  items = [v.strip() for v in values if v.strip()]
  try:
    numbers = [int(v) for v in items]
  except ValueError:
    raise ValueError(f"--seeds={','.join(values)}: give a count (--seeds=3: seeds --seed to "
                     "--seed+2) or a list of integer seeds (--seeds=0,4,7)") from None
  if not numbers:
    raise ValueError("--seeds is empty: give a count (--seeds=3) or a list (--seeds=0,4,7)")
  if len(numbers) > 1 and min(numbers) < 0:
    raise ValueError(f"--seeds={','.join(items)}: seeds are non-negative integers (numpy's "
                     "generators take no negative seed)")
  if len(numbers) == 1:
    if numbers[0] < 1:
      raise ValueError(f"--seeds={numbers[0]}: a count of seeds must be at least 1 (to run "
                       "one given seed, use --seed)")
    return list(range(seed, seed + numbers[0]))
  if len(set(numbers)) != len(numbers):
    raise ValueError(f"--seeds={','.join(items)} repeats a seed; list each seed once")
  return numbers


def run_dir(workdir: str, run: str, seed: int, seeded: bool) -> str:
  """Where one seed of a run lives: ``<workdir>/<run>/seed_<seed>`` (``--seeds``) or
  ``<workdir>/<run>`` (one seed, the unseeded layout)."""
  base = os.path.join(workdir, run)
  return os.path.join(base, f"{SEED_DIR_PREFIX}{seed}") if seeded else base


def seed_dirs(run_path: str) -> list[str]:
  """The seed directories holding a ``metrics.jsonl`` under a run's directory, in seed
  order; ``[run_path]`` itself for an unseeded run; ``[]`` if neither."""
  found = []
  if os.path.isdir(run_path):
    for name in os.listdir(run_path):
      rest = name[len(SEED_DIR_PREFIX):]
      path = os.path.join(run_path, name)
      if name.startswith(SEED_DIR_PREFIX) and rest.lstrip("-").isdigit() and \
          os.path.exists(os.path.join(path, "metrics.jsonl")):
        found.append((int(rest), path))
  if found:
    return [p for _, p in sorted(found)]
  return [run_path] if os.path.exists(os.path.join(run_path, "metrics.jsonl")) else []


def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
  """The two-sided Student-t quantile :math:`t_{(1+c)/2, n-1}` of ``n`` samples."""
  from scipy import stats
  return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


class Stat(NamedTuple):
  """A metric over seeds: mean, sample standard deviation (0 for one seed) and count.
  ``paired`` marks a paired gap to a baseline (its cells say whether it exceeds the
  noise)."""
  mean: float
  std: float
  n: int
  paired: bool = False

  @classmethod
  def of(cls, values: Iterable[float], paired: bool = False) -> "Stat | None":
    xs = [float(v) for v in values if v is not None]
    if not xs:
      return None
    mean = math.fsum(xs) / len(xs)
    var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return cls(mean, math.sqrt(var), len(xs), paired)

  @property
  def half_width(self) -> float:
    """Half the 95% Student-t confidence interval of the mean (inf for one seed)."""
    if self.n < 2:
      return math.inf
    return t_quantile(self.n) * self.std / math.sqrt(self.n)

  @property
  def exceeds_noise(self) -> bool:
    """The 95% interval of the mean excludes zero (needs two or more seeds)."""
    return self.n >= 2 and abs(self.mean) > self.half_width

  def format(self, digits: int = 4) -> str:
    if self.n < 2:
      return f"{self.mean:.{digits}f}"
    text = f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
    return text + " *" if self.paired and self.exceeds_noise else text

  def to_json(self) -> dict[str, Any]:
    out = {"mean": self.mean, "std": self.std, "n": self.n}
    if self.paired:
      out["ci95_half_width"] = None if self.n < 2 else self.half_width
      out["exceeds_noise"] = self.exceeds_noise
    return out


def paired_gap(runs: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]],
               key: str) -> Stat | None:
  """``key`` of ``runs`` minus ``key`` of ``base``, seed by seed (final.json dicts with a
  ``seed``); only the seeds both finished with a value count."""
  by_seed = {f["seed"]: f.get(key) for f in base}
  gaps = [f[key] - by_seed[f["seed"]] for f in runs
          if f.get(key) is not None and by_seed.get(f["seed"]) is not None]
  return Stat.of(gaps, paired=True)


def aggregate(per_seed: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
  """One run's seeds (final.json dicts) -> one summary row: ``metrics`` as :class:`Stat`,
  every other field its common value (or the list of the seeds' values, if they
  differ)."""
  row: dict[str, Any] = {}
  for key in per_seed[0]:
    if key in metrics:
      row[key] = Stat.of(f.get(key) for f in per_seed)
    else:
      values = [f.get(key) for f in per_seed]
      row[key] = values[0] if all(v == values[0] for v in values) else values
  row["seeds"] = len(per_seed)
  return row


def to_json(row: dict[str, Any]) -> dict[str, Any]:
  """A summary row with its :class:`Stat` cells as ``{"mean", "std", "n", ...}``."""
  return {k: (v.to_json() if isinstance(v, Stat) else v) for k, v in row.items()}
