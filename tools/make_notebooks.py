"""Builds notebooks/quickstart.ipynb and notebooks/recipes.ipynb from the cells below and
executes them in place (nbclient), so the committed notebooks carry their outputs.

    .venv/bin/python tools/make_notebooks.py          # rebuild and execute both

tests/test_notebooks.py executes the committed notebooks again in CI.
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

QUICKSTART = [
    ("md", "# fp4jax quickstart\n\nFormats, `fp4jax.quantize`, and the quantization error "
           "against block size. Every number below is computed when the notebook runs."),
    ("code", "import jax, jax.numpy as jnp, numpy as np\nimport matplotlib\n"
             "matplotlib.use('Agg')\nimport matplotlib.pyplot as plt\nimport fp4jax\n"
             "print('jax', jax.__version__, 'on', jax.devices()[0].platform)"),
    ("md", "## Formats\nAn element format is a small float (E2M1 is FP4); a spec adds the "
           "block size, the scale format and the rounding rule."),
    ("code", "e2m1 = fp4jax.formats.get_element_format('e2m1')\n"
             "print('E2M1 grid:', e2m1.grid())\n"
             "for name in ['mxfp4', 'nvfp4', 'mxfp8_e4m3']:\n"
             "  s = fp4jax.get_spec(name)\n"
             "  print(f'{name:11} element {s.element.name}, scale {s.scale_format.name}, '\n"
             "        f'block {s.block_size}, tensor scale {s.tensor_scale}')"),
    ("md", "## Quantize and dequantize\nA `QArray` holds packed codes and block scales; "
           "`bits_per_element` counts both."),
    ("code", "x = jax.random.normal(jax.random.key(0), (256, 1024), jnp.float32)\n"
             "for name in ['mxfp4', 'nvfp4']:\n"
             "  q = fp4jax.quantize(x, name, axis=-1)\n"
             "  err = fp4jax.dequantize(q, jnp.float32) - x\n"
             "  snr = 10 * np.log10(float(jnp.sum(x**2) / jnp.sum(err**2)))\n"
             "  print(f'{name}: {q.bits_per_element} bits/element, {q.nbytes} bytes, '\n"
             "        f'SNR {snr:.2f} dB')"),
    ("md", "## Stochastic rounding is unbiased\nThe mean of many stochastically rounded "
           "copies converges to x; nearest rounding keeps its bias."),
    ("code", "v = jnp.full((1, 32), 0.3)\n"
             "keys = jax.random.split(jax.random.key(1), 2000)\n"
             "sr = jax.vmap(lambda k: fp4jax.fake_quant(v, 'mxfp4', rounding='stochastic', "
             "key=k))(keys)\n"
             "print('value 0.3 -> nearest', float(fp4jax.fake_quant(v, 'mxfp4')[0, 0]),\n"
             "      '| stochastic mean', round(float(sr.mean()), 4))"),
    ("md", "## Error against block size\nSmaller blocks follow the local magnitude more "
           "closely: higher SNR, more scale bits. Heavy-tailed data gains most."),
    ("code", "rng = np.random.default_rng(0)\n"
             "data = {'normal': rng.standard_normal((256, 1024)),\n"
             "        'student-t (3)': rng.standard_t(3, (256, 1024))}\n"
             "blocks = [8, 16, 32, 64, 128, 256]\n"
             "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
             "for label, arr in data.items():\n"
             "  xs = jnp.asarray(arr, jnp.float32)\n"
             "  for scale in ['e8m0', 'ue4m3']:\n"
             "    snrs = []\n"
             "    for b in blocks:\n"
             "      spec = fp4jax.QuantSpec('e2m1', scale, block_size=b,\n"
             "                              scale_mode='floor' if scale == 'e8m0' else 'amax',\n"
             "                              tensor_scale=None if scale == 'e8m0' else 'amax')\n"
             "      e = fp4jax.fake_quant(xs, spec, axis=-1) - xs\n"
             "      snrs.append(10 * np.log10(float(jnp.sum(xs**2) / jnp.sum(e**2))))\n"
             "    ax.plot(blocks, snrs, 'o-', label=f'{label}, {scale}')\n"
             "    print(label, scale, ' '.join(f'{s:.2f}' for s in snrs))\n"
             "ax.set_xscale('log', base=2); ax.set_xlabel('block size'); "
             "ax.set_ylabel('SNR (dB)')\n"
             "ax.set_title('E2M1 quantization SNR'); ax.legend(fontsize=7); ax.grid(alpha=0.3)\n"
             "fig.tight_layout(); fig.savefig('quickstart_block_size.png'); plt.close(fig)"),
    ("code", "from IPython.display import Image\nImage('quickstart_block_size.png')"),
]

RECIPES = [
    ("md", "# Recipes on a small model\n\nAn MLP on scikit-learn's digits trained with "
           "`fp4jax.linen.QDense` layers under several FP4 training recipes (all six GEMM "
           "operands quantized), against the unquantized model."),
    ("code", "import jax, jax.numpy as jnp, numpy as np, optax\nimport flax.linen as nn\n"
             "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
             "import fp4jax, fp4jax.linen as qnn\nfrom experiments import data\n"
             "ds = data.load_digits()\nx_tr = ds.train_x.reshape(len(ds.train_y), -1)\n"
             "x_te = ds.test_x.reshape(len(ds.test_y), -1)\n"
             "print(x_tr.shape, x_te.shape)"),
    ("code", "class MLP(nn.Module):\n  recipe: str\n  @nn.compact\n  def __call__(self, x):\n"
             "    dense = (lambda n, name: nn.Dense(n, name=name)) if self.recipe == 'bf16' else \\\n"
             "        (lambda n, name: qnn.QDense(n, recipe=self.recipe, name=name))\n"
             "    x = nn.gelu(dense(256, 'fc1')(x))\n    x = nn.gelu(dense(128, 'fc2')(x))\n"
             "    return nn.Dense(10, name='head')(x)  # head in high precision\n\n"
             "def train(recipe, steps=300, seed=0):\n  m = MLP(recipe)\n"
             "  # jit: one compile (op by op, each quantizer primitive would compile alone)\n"
             "  params = jax.jit(m.init)({'params': jax.random.key(seed), 'quant': jax.random.key(1)},\n"
             "                           x_tr[:2])['params']\n  tx = optax.adam(3e-3)\n  opt = tx.init(params)\n"
             "  def loss_fn(p, x, y, k):\n"
             "    logits = m.apply({'params': p}, x, rngs={'quant': k})\n"
             "    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()\n"
             "  @jax.jit\n  def step(p, o, x, y, k):\n"
             "    l, g = jax.value_and_grad(loss_fn)(p, x, y, k)\n"
             "    u, o = tx.update(g, o, p)\n    return optax.apply_updates(p, u), o, l\n"
             "  losses = []\n  for i in range(steps):\n"
             "    idx = data.batches(len(ds.train_y), 128, seed, i)\n"
             "    params, opt, l = step(params, opt, x_tr[idx], ds.train_y[idx],\n"
             "                          jax.random.fold_in(jax.random.key(2), i))\n"
             "    losses.append(float(l))\n"
             "  logits = jax.jit(m.apply)({'params': params}, x_te, rngs={'quant': jax.random.key(3)})\n"
             "  return losses, float(jnp.mean(jnp.argmax(logits, -1) == ds.test_y))"),
    ("code", "results = {}\nfor recipe in ['bf16', 'mxfp4', 'tetrajet', 'nvfp4', 'quartet']:\n"
             "  results[recipe] = train(recipe)\n"
             "  print(f'{recipe:9} final train loss {np.mean(results[recipe][0][-20:]):.4f}  '\n"
             "        f'test accuracy {results[recipe][1]:.4f}')"),
    ("code", "fig, ax = plt.subplots(figsize=(6, 3.5))\nfor r, (losses, acc) in results.items():\n"
             "  sm = np.convolve(losses, np.ones(10) / 10, mode='valid')\n"
             "  ax.plot(sm, label=f'{r} (test acc {acc:.3f})')\n"
             "ax.set_yscale('log'); ax.set_xlabel('step'); ax.set_ylabel('train loss (10-step mean)')\n"
             "ax.legend(fontsize=7); ax.grid(alpha=0.3); fig.tight_layout()\n"
             "fig.savefig('recipes_loss.png'); plt.close(fig)\n"
             "from IPython.display import Image\nImage('recipes_loss.png')"),
]


def build(cells) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else
              nbformat.v4.new_code_cell(src) for kind, src in cells]
  return nb


def execute(path: str, timeout: int = 900) -> nbformat.NotebookNode:
  """Runs the notebook at ``path`` in its folder (repository root on the path)."""
  nb = nbformat.read(path, as_version=4)
  os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  return nb


def main():
  for name, cells in (("quickstart", QUICKSTART), ("recipes", RECIPES)):
    path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
    nbformat.write(build(cells), path)
    nb = execute(path)
    nbformat.write(nb, path)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  main()
