"""Representative, randomly varied subsets of the slow parameter sweeps on CPU.

The Pallas kernels run in interpret mode on CPU, where one compiled configuration costs
seconds; the GPU test command (``tools/test_gpu.sh``, ``FP4JAX_FULL_SWEEPS=1``) runs every
combination compiled. On CPU a sweep runs ``k`` combinations that cover every value of
every axis at least once, the rest drawn at random. The draw changes from run to run
(``FP4JAX_SWEEP_SEED``, printed in pytest's header; set it to replay a run), so repeated
CI runs cover the whole product over time; conftest fixes the seed before xdist's workers
start, so every worker collects the same tests.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest

FULL = os.environ.get("FP4JAX_FULL_SWEEPS", "") == "1"


def seed() -> int:
  return int(os.environ.get("FP4JAX_SWEEP_SEED", "0"))


def _labelled(values):
  if isinstance(values, dict):
    return list(values.items())
  return [(str(v), v) for v in values]


def product(k: int, **axes) -> list:
  """``pytest.param`` combinations of ``axes`` (each a list, or a dict id -> value) for
  ``@pytest.mark.parametrize(",".join(axes), product(k, **axes))``: all of them with
  ``FP4JAX_FULL_SWEEPS=1``, else ``k`` that cover every value of every axis."""
  names = list(axes)
  labelled = [_labelled(axes[n]) for n in names]
  combos = list(itertools.product(*labelled))
  if not FULL and k < len(combos):
    rnd = random.Random(f"{seed()}/{'/'.join(names)}/{len(combos)}")
    chosen: list[int] = []
    for d, values in enumerate(labelled):  # every value of every axis at least once
      for label, _ in values:
        if not any(combos[i][d][0] == label for i in chosen):
          chosen.append(rnd.choice([i for i, c in enumerate(combos) if c[d][0] == label]))
    rest = [i for i in range(len(combos)) if i not in chosen]
    chosen += rnd.sample(rest, max(0, min(k - len(chosen), len(rest))))
    combos = [combos[i] for i in sorted(set(chosen))]
  return [pytest.param(*[v for _, v in c], id="-".join(label for label, _ in c))
          for c in combos]
