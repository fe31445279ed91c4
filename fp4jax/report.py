"""Quantization error table: bits per element and SNR of every preset on several inputs.

    python -m fp4jax.report [--rows 2048] [--cols 256] [--seed 0] [--markdown]

For each preset the table gives the storage cost (element bits plus scale bits per
element, as stored, tensor scale excluded) and the signal-to-quantization-noise ratio
``SNR = 10 log10(sum x^2 / sum (x - Q(x))^2)`` in dB on Gaussian, Laplace and
Student-t(2) samples and on real data: scikit-learn's bundled 8x8 digits images
(1797 x 64 pixel intensities, no download). A second table compares the MXFP4 scale
modes. Blocks run along the last axis; non-divisible shapes are zero-padded.
"""

from __future__ import annotations

import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fp4jax

FLAGS = flags.FLAGS


def define_flags() -> None:
  """absl flags, as every other entry point (experiments/, kernels/), defined only when
  run as a program (importing this module defines nothing, so it cannot clash with an
  application's own ``--seed``)."""
  flags.DEFINE_integer("rows", 2048, "rows of each synthetic input", lower_bound=1)
  flags.DEFINE_integer("cols", 256, "columns of each synthetic input", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "numpy seed of the synthetic inputs")
  flags.DEFINE_bool("markdown", False, "print Markdown tables")


def print_report(rows: int = 2048, cols: int = 256, seed: int = 0,
                 markdown: bool = False) -> None:
  """The report of ``python -m fp4jax.report``, callable from code.

  Raises:
    ValueError: ``rows`` or ``cols`` is not a positive int (an empty input has no
      quantization error to report).
  """
  for name, v in (("rows", rows), ("cols", cols)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"print_report: {name} must be a positive int (the synthetic inputs' "
                       f"shape), got {v!r}")
  start = time.perf_counter()
  data = datasets(rows, cols, seed)
  names = list(data)
  print(f"fp4jax {fp4jax.__version__} | jax {jax.__version__} | {fp4jax.dispatch.device_facts().platform} "
        f"| {platform.machine()} | synthetic {rows}x{cols}, seed {seed}\n")
  print("Every preset (blocks along the last axis):")
  print(format_table(error_table(data, dict(fp4jax.PRESETS)), names, markdown))
  base = fp4jax.get_spec("mxfp4")
  modes = {f"mxfp4 {m}": base.replace(scale_mode=m) for m in ("floor", "ceil", "even", "rceil")}
  modes.update({f"mxfp4 block {b}": base.replace(block_size=b) for b in (8, 16, 64)})
  modes["e2m1 blk16 ue4m3 (1-level)"] = fp4jax.get_spec("nvfp4").replace(tensor_scale=None)
  print("\nMXFP4 scale modes and block sizes (E2M1 elements):")
  print(format_table(error_table(data, modes), names, markdown))
  print(f"\n({time.perf_counter() - start:.1f} s)")


def datasets(rows: int, cols: int, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  data = {
      "gaussian": rng.standard_normal((rows, cols)),
      "laplace": rng.laplace(size=(rows, cols)),
      "student_t2": rng.standard_t(2, size=(rows, cols)),
  }
  try:
    from sklearn.datasets import load_digits
    data["digits"] = load_digits().data  # (1797, 64), values 0..16
  except ImportError:  # scikit-learn is an optional extra
    pass
  return {k: np.asarray(v, np.float32) for k, v in data.items()}


def snr_db(x: np.ndarray, y: np.ndarray) -> float:
  x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  noise = np.sum((x64 - y64) ** 2)
  return float("inf") if noise == 0 else float(10 * np.log10(np.sum(x64**2) / noise))


def error_table(data: dict[str, np.ndarray], specs: dict[str, fp4jax.QuantSpec]):
  rows = []
  for name, spec in specs.items():
    quant = lambda v, s=spec: fp4jax.quantize(v, s, axis=-1, pad=True)
    # One compiled quantize + dequantize per spec (op by op, dequantize compiles each of
    # its primitives separately).
    roundtrip = jax.jit(lambda v, quant=quant: fp4jax.dequantize(quant(v), jnp.float32))
    row = {"preset": name}
    for dname, x in data.items():
      row[dname] = snr_db(x, np.asarray(roundtrip(jnp.asarray(x))))
      if dname == "gaussian":   # storage bits from the shapes alone
        row["bits"] = jax.eval_shape(quant, jnp.asarray(x)).bits_per_element
    rows.append(row)
  return rows


def format_table(rows, columns, markdown: bool) -> str:
  head = ["preset", "bits/elem"] + [f"{c} SNR dB" for c in columns]
  body = [[r["preset"], f"{r['bits']:.3f}"] + [f"{r[c]:.2f}" for c in columns] for r in rows]
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
  if markdown:
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(b) for b in body])
  line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return "\n".join([line(head), "-" * (sum(widths) + 2 * len(widths))] + [line(b) for b in body])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  print_report(FLAGS.rows, FLAGS.cols, FLAGS.seed, FLAGS.markdown)


if __name__ == "__main__":
  define_flags()
  app.run(main)
