"""Reference models built from fp4jax's layers: a Vision Transformer (Dosovitskiy et al.,
2021), a byte-level GPT (decoder-only transformer, Radford et al., 2019) and an MLP.

They are what the experiments train (``experiments/``) and what the kernel lab's
benchmarks time (``kernels/bench_step.py``), from one importable place that neither
side's command-line flags drive: every choice is a constructor argument.

Every linear layer is ``fp4jax.linen.QDense`` with the model's ``recipe`` (plain
``flax.linen.Dense`` when the recipe is None or "bf16"), except the classifier head,
which stays in high precision as in NVIDIA's NVFP4 recipe and TetraJet. The attention
products (QK^T, AV) are not quantized: the recipes quantize the linear layers' GEMMs.
A mixture-of-experts GPT (``experts > 0``, e.g. ``"gpt_tiny_moe"``) runs each block's MLP as
a :class:`MoEMLP`, its experts' GEMMs quantized per expert
(:class:`fp4jax.linen.GroupedDense`); its router stays in high precision.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import fp4jax.linen as qnn

VIT_CONFIGS = {  # name -> (patch, width, depth, heads, mlp)
    "vit_s16": (16, 384, 12, 6, 1536),
    "vit_b16": (16, 768, 12, 12, 3072),
    "vit_tiny": (8, 64, 4, 4, 256),       # 32x32 images: 16 patches of 8x8x3
}


def dense(features: int, recipe: Any, dtype: Any, name: str) -> nn.Module:
  """A quantized dense layer of ``recipe`` (or a plain one for None / "bf16"). A callable
  ``recipe`` is a ``dot_general`` of one's own (``lax.dot_general``'s signature), given to
  ``flax.linen.Dense``: how a benchmark times a hand-written quantization in the same
  model."""
  if recipe is None or recipe == "bf16":
    return nn.Dense(features, dtype=dtype, name=name)
  if callable(recipe):
    return nn.Dense(features, dtype=dtype, name=name, dot_general=recipe)
  return qnn.QDense(features, recipe=recipe, dtype=dtype, name=name)


MOE_AUX_LOSS = "moe_aux_loss"   # the name MoEMLP sows its load-balancing loss under


class _Experts(nn.Module):
  """The experts' two grouped GEMMs (a parent named ``experts``, so that rules such as
  ``RULE_SETS["moe_experts_mxfp4"]`` can target them)."""
  experts: int
  width: int
  mlp: int
  recipe: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, group_sizes):
    recipe = None if self.recipe is None or self.recipe == "bf16" else self.recipe
    h = qnn.GroupedDense(self.experts, self.mlp, recipe, self.dtype, name="fc1")(x, group_sizes)
    return qnn.GroupedDense(self.experts, self.width, recipe, self.dtype,
                            name="fc2")(nn.gelu(h), group_sizes)


class MoEMLP(nn.Module):
  """Top-k mixture-of-experts MLP (Shazeer et al. 2017; Switch, Fedus et al. 2021; gpt-oss
  routes each token to 4 of 32 or 128 experts): tokens (..., width) -> (..., width).

  A high-precision linear router scores the experts; each token goes to its ``top_k``
  best, weighted by the softmax of the selected scores (gpt-oss's routing). The
  ``tokens * top_k`` assignments are sorted by expert, so each expert's rows are
  contiguous, and the experts' GELU MLPs run as two grouped GEMMs
  (:class:`fp4jax.linen.GroupedDense`, quantized per expert by ``recipe``); the results
  are weighted and summed back per token. The Switch load-balancing loss
  ``E * sum_e f_e p_e`` (``f_e`` the fraction of assignments to expert e, ``p_e`` its mean
  router probability; 1 when balanced) is sown in ``"intermediates"`` under
  :data:`MOE_AUX_LOSS`: apply with ``mutable=["intermediates"]`` to add it to the loss.
  """
  width: int
  mlp: int
  experts: int = 8
  top_k: int = 2
  recipe: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not 1 <= self.top_k <= self.experts:
      raise ValueError(f"MoEMLP: top_k={self.top_k} must be in 1..experts={self.experts}")
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    logits = nn.Dense(self.experts, dtype=jnp.float32, name="router")(tokens)
    top_logits, top_experts = jax.lax.top_k(logits, self.top_k)            # (T, k)
    gate = jax.nn.softmax(top_logits, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    frac = jnp.mean(jax.nn.one_hot(top_experts, self.experts).sum(1), 0) / self.top_k
    self.sow("intermediates", MOE_AUX_LOSS, self.experts * jnp.sum(frac * probs.mean(0)))
    flat = top_experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)          # assignments sorted by expert
    token_of = order // self.top_k
    group_sizes = jnp.bincount(flat, length=self.experts).astype(jnp.int32)
    y = _Experts(self.experts, shape[-1], self.mlp, self.recipe, self.dtype,
                 name="experts")(tokens[token_of].astype(self.dtype), group_sizes)
    y = y.astype(jnp.float32) * gate.reshape(-1)[order][:, None]
    out = jnp.zeros(tokens.shape, jnp.float32).at[token_of].add(y)
    return out.astype(x.dtype).reshape(shape)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block; ``causal`` masks attention to earlier positions (GPT);
  ``experts > 0`` replaces the MLP by a :class:`MoEMLP` of that many experts (``mlp``
  wide each, ``top_k`` per token)."""
  width: int
  heads: int
  mlp: int
  recipe: Any = None
  dtype: Any = jnp.float32
  causal: bool = False
  experts: int = 0
  top_k: int = 2

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    hd = self.width // self.heads
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    qkv = dense(3 * self.width, self.recipe, self.dtype, "qkv")(y)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, hd), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, 0], k[:, :, 0]) / jnp.sqrt(hd).astype(x.dtype)
    if self.causal:
      logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(logits.dtype).min)
    att = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v[:, :, 0]).reshape(b, t, self.width)
    x = x + dense(self.width, self.recipe, self.dtype, "proj")(y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    if self.experts:
      return x + MoEMLP(self.width, self.mlp, self.experts, self.top_k, self.recipe,
                        self.dtype, name="moe")(y)
    y = nn.gelu(dense(self.mlp, self.recipe, self.dtype, "fc1")(y))
    return x + dense(self.width, self.recipe, self.dtype, "fc2")(y)


class _ScannedBlock(EncoderBlock):
  """An encoder block in ``nn.scan``'s (carry, x) -> (carry, y) form."""

  @nn.compact
  def __call__(self, x, _):
    return super().__call__(x), None


class ViT(nn.Module):
  """Vision Transformer with a class token; images (B, H, W, C) -> logits (B, classes).

  ``scan_layers=True`` runs the encoder blocks as one ``nn.scan`` (parameters stacked
  along a leading depth axis under ``blocks``): the step compiles one block instead of
  ``depth``, which matters most with quantized layers and Pallas kernels (each distinct
  kernel call is lowered and compiled separately). Per-layer quantization keys are split
  from the step's "quant" key either way.
  """

  num_classes: int
  patch: int = 16
  width: int = 384
  depth: int = 12
  heads: int = 6
  mlp: int = 1536
  recipe: Any = None
  dtype: Any = jnp.float32
  scan_layers: bool = False
  quantize_embed: bool = True  # False: the patch embedding stays high precision

  @classmethod
  def from_name(cls, name: str, num_classes: int, **kw) -> "ViT":
    if name not in VIT_CONFIGS:
      raise ValueError(f"unknown ViT {name!r}; choose one of {sorted(VIT_CONFIGS)}")
    p, w, d, h, m = VIT_CONFIGS[name]
    return cls(num_classes, p, w, d, h, m, **kw)

  @nn.compact
  def __call__(self, images):
    b, hh, ww, c = images.shape
    p = self.patch
    if hh % p or ww % p:
      raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    x = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (hh // p) * (ww // p), p * p * c).astype(self.dtype)
    x = dense(self.width, self.recipe if self.quantize_embed else None, self.dtype, "embed")(x)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], 1)
    pos = self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    if self.scan_layers:
      blocks = nn.scan(_ScannedBlock, variable_axes={True: 0}, split_rngs={True: True},
                       length=self.depth)
      x, _ = blocks(self.width, self.heads, self.mlp, self.recipe, self.dtype,
                    name="blocks")(x, None)
    else:
      for i in range(self.depth):
        x = EncoderBlock(self.width, self.heads, self.mlp, self.recipe, self.dtype,
                         name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln")(x[:, 0])
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(x)


class GPTConfig(NamedTuple):
  """A GPT's shape; ``experts > 0``: every block's MLP is a top-``top_k`` MoE of
  ``experts`` experts, each ``mlp`` wide."""
  width: int
  depth: int
  heads: int
  mlp: int
  context: int
  experts: int = 0
  top_k: int = 2


GPT_CONFIGS = {
    "gpt_tiny": GPTConfig(128, 4, 4, 512, 64),
    "gpt_tiny_moe": GPTConfig(128, 4, 4, 128, 64, experts=8, top_k=2),
    "gpt_small": GPTConfig(768, 12, 12, 3072, 1024),
}


class GPT(nn.Module):
  """Byte-level decoder-only transformer: tokens (B, T) int -> logits (B, T, vocab).

  Every linear layer of the blocks uses ``recipe`` except those of the last
  ``high_precision_last`` blocks (NVIDIA's NVFP4 recipe keeps the last blocks in BF16);
  the embeddings and the output head stay in high precision. ``scan_layers=True`` runs the
  quantized blocks as one ``nn.scan`` (parameters stacked under ``blocks``), so a step
  compiles one block instead of ``depth`` (GPT-small with NVFP4 compiles in seconds
  rather than minutes); the high-precision last blocks stay unrolled.
  """

  vocab: int = 256
  width: int = 128
  depth: int = 4
  heads: int = 4
  mlp: int = 512
  context: int = 128
  recipe: Any = None
  dtype: Any = jnp.float32
  high_precision_last: int = 0
  scan_layers: bool = False  # as ViT's: the quantized blocks as one nn.scan (one compile)
  experts: int = 0           # > 0: mixture-of-experts MLPs (MoEMLP)
  top_k: int = 2

  @classmethod
  def from_name(cls, name: str, **kw) -> "GPT":
    if name not in GPT_CONFIGS:
      raise ValueError(f"unknown GPT {name!r}; choose one of {sorted(GPT_CONFIGS)}")
    c = GPT_CONFIGS[name]
    return cls(256, c.width, c.depth, c.heads, c.mlp, c.context, experts=c.experts,
               top_k=c.top_k, **kw)

  @nn.compact
  def __call__(self, tokens):
    b, t = tokens.shape
    if t > self.context:
      raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens).astype(self.dtype)
    pos = self.param("pos", nn.initializers.normal(0.02), (1, self.context, self.width))
    x = x + pos[:, :t].astype(x.dtype)
    n_quantized = self.depth - self.high_precision_last
    first = 0
    if self.scan_layers and n_quantized > 0:
      blocks = nn.scan(_ScannedBlock, variable_axes={True: 0}, split_rngs={True: True},
                       length=n_quantized)
      x, _ = blocks(self.width, self.heads, self.mlp, self.recipe, self.dtype, causal=True,
                    experts=self.experts, top_k=self.top_k, name="blocks")(x, None)
      first = n_quantized
    for i in range(first, self.depth):
      recipe = None if i >= n_quantized else self.recipe
      x = EncoderBlock(self.width, self.heads, self.mlp, recipe, self.dtype, causal=True,
                       experts=self.experts, top_k=self.top_k, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln")(x)
    return nn.Dense(self.vocab, dtype=jnp.float32, name="head")(x)


class MLP(nn.Module):
  """Two hidden GELU layers of ``recipe`` (plain Dense for None / "bf16") and a
  high-precision head: the quick model of ``experiments.sweep --train``."""

  num_classes: int = 10
  hidden: tuple[int, ...] = (256, 128)
  recipe: Any = None

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, n in enumerate(self.hidden):
      x = nn.gelu(dense(n, self.recipe, jnp.float32, f"fc{i + 1}")(x))
    return nn.Dense(self.num_classes, name="head")(x)
