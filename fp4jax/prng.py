"""Counter-based random bits for stochastic rounding.

fp4jax derives stochastic rounding's bits from a hash of ``(seed, index)`` rather than
from ``jax.random.bits`` directly, so that a Pallas kernel (which has no PRNG on the
Triton path) can compute exactly the same bits in-kernel from the same two seed words and
its element indices: the reference and the kernel then agree bit for bit.

**One 32-bit hash per four elements, eight random bits each.** Element ``i`` (row-major
index) takes byte ``i mod 4`` (the most significant first) of the word for ``i // 4`` as
the top byte of its rounding word, and a centring constant below it::

    word[w] = mix(mix(w ^ seed0) + seed1)
    byte    = (word[i // 4] << 8 * (i mod 4)) & 0xFF000000
    tie     = lowest bit of the partner byte, lane (i mod 4) ^ 1, of the same word
    bits[i] = byte | (0x00800000 - tie)          # 0x00800000 or 0x007FFFFF

The rounding functions compare the top ``s`` bits of an element's word with the ``s``
dropped bits of its value (:func:`fp4jax.bits.round_shift_right`), so eight random bits
quantize the round-up probability ``p`` to 1/256: with ``y = 256 p`` it becomes
``ceil(y - 1/2) / 256``, the nearest multiple of 1/256, and at the half-way points (``y``
an odd multiple of 1/2) ``floor(y) / 256`` or ``ceil(y) / 256`` as ``tie`` (a random bit
independent of the element's byte) is 0 or 1, i.e. exactly ``p`` on average. Hence:

* the expectation of a rounding is within ``2^-9`` of a grid step of its input
  (``2^-9 + 2^-31`` where the shift exceeds 31 and ``round_shift_right`` truncates first);
* it is exact where ``y`` is an integer or a half-integer, i.e. the dropped part is a
  multiple of 2^-9 of a step: for a bf16 input under a power-of-two scale, wherever the
  grid step is at most 2^9 times the input's last bit (for E2M1: every scaled ``|x|`` in
  [1/8, 6]; beyond 6 it saturates, as with any rounding);
* the quantization errors ``ceil(y - 1/2) - y`` have no systematic sign over inputs with
  ``p >= 2^-8`` (tested over every bf16 value of each E2M1 binade of [2^-9, 6));
* below that they do: ``p < 2^-9`` never rounds up, and ``2^-9 < p < 2^-8`` rounds up
  with probability 2^-8. So a value within ``2^-9`` of a step above a grid point rounds
  down to it always; in E2M1's first step (half the block scale) a scaled ``|x| < 2^-10``,
  some 4000 times below the block's largest, becomes 0, where 32 random bits would round
  it up with probability ``p``. That is the price of eight bits.

The word space is tested exhaustively (every value below over all 512 (byte, tie) words,
``tests/test_prng.py``), on sampled and constructed inputs, through the general encoder;
the kernels' fast E2M1 paths are tested equal to it on fp4jax's own words.
Why eight: the hash was most of stochastic rounding's cost (two ``lowbias32`` rounds per
element: ``kernels/NOTES.md``, "Issue 18, sixth step"), and one 32-bit word per four
values is also the budget of Blackwell's ``cvt.rs.satfinite.e2m1x4.f32 d, {a, b, e, f},
rbits`` (PTX ISA; how the hardware splits ``rbits`` is not assumed here, so these bits are
fp4jax's, not the instruction's). A caller who wants 32 bits per element passes them as
``random_bits=`` (every quantizer takes them; their top bits are used the same way).

Word indices: ``i // 4`` of the row-major index, as uint32. Where the last axis is a
multiple of 4 they are counted per word (exact up to 2^34 elements); otherwise per
element, and the element index wraps above 2^32 elements (kernels follow the same rule).

The hash is two rounds of the ``lowbias32`` integer finalizer (C. Wellons, "Hash
function prospector", 2018; shifts 16/15/15, multipliers 0x21f0aaad / 0x735a2d97),
each a bijection of uint32. The seed words come from a ``jax.random`` key, so a run is
reproducible from its keys.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

U32 = jnp.uint32

ELEMENTS_PER_WORD = 4       # elements sharing one 32-bit hash
BITS_PER_ELEMENT = 8        # random bits each takes (the top byte of its rounding word)
# Python ints, not arrays: a module-level jax constant would be captured by kernels.
_LANE_MASK = 0xFF000000
_CENTRE = 0x00800000  # half of the byte's last step, less the tie bit: centres it


def mix32(h: jax.Array) -> jax.Array:
  """The lowbias32 finalizer: a bijection of uint32 with good avalanche."""
  h = h.astype(U32)
  h = h ^ (h >> 16)
  h = h * U32(0x21F0AAAD)
  h = h ^ (h >> 15)
  h = h * U32(0x735A2D97)
  return h ^ (h >> 15)


def counter_hash(seed: jax.Array, counter: jax.Array) -> jax.Array:
  """Uniform uint32 words for indices ``counter`` under ``seed`` (2 uint32 words)."""
  seed = jnp.asarray(seed, U32)
  return counter_hash_words(seed[0], seed[1], counter)


def counter_hash_words(seed0: jax.Array, seed1: jax.Array, counter: jax.Array) -> jax.Array:
  """:func:`counter_hash` with the seed as two scalars (the form kernels load)."""
  return mix32(mix32(counter.astype(U32) ^ seed0.astype(U32)) + seed1.astype(U32))


def lane_bits(words: jax.Array, lane: jax.Array) -> jax.Array:
  """The rounding word of the element in byte lane ``lane`` (0-3) of its ``words``: that
  byte as the top byte, then the centring constant less the tie bit (the lowest bit of
  the partner lane ``lane ^ 1``'s byte)."""
  words, lane = words.astype(U32), lane.astype(U32)
  byte = (words << (lane * U32(BITS_PER_ELEMENT))) & U32(_LANE_MASK)
  partner_lsb = U32(24) - (lane ^ U32(1)) * U32(BITS_PER_ELEMENT)
  tie = (words >> partner_lsb) & U32(1)
  return byte | (U32(_CENTRE) - tie)


def element_bits_words(seed0: jax.Array, seed1: jax.Array, counter: jax.Array) -> jax.Array:
  """The rounding words of the elements with row-major indices ``counter`` (uint32, any
  shape): one hash per element's word, for kernels that hold element indices. Equals
  :func:`random_bits_for` at those indices."""
  counter = counter.astype(U32)
  return word_lane_bits(seed0, seed1, counter >> U32(2), counter & U32(ELEMENTS_PER_WORD - 1))


def word_lane_bits(seed0: jax.Array, seed1: jax.Array, word: jax.Array,
                   lane: jax.Array) -> jax.Array:
  """The rounding words of elements given by their word index and lane (uint32 arrays
  of one shape): one hash per element."""
  return lane_bits(counter_hash_words(seed0, seed1, word), lane)


def expand_words(words: jax.Array) -> jax.Array:
  """Rounding words of ``(..., 4n)`` elements from their ``(..., n)`` hashed words (lane
  ``j`` of word ``k`` for element ``4k + j`` of the last axis)."""
  lanes = lane_bits(words[..., None], jnp.arange(ELEMENTS_PER_WORD, dtype=U32))
  return lanes.reshape(words.shape[:-1] + (words.shape[-1] * ELEMENTS_PER_WORD,))


def interleave_lanes(words: jax.Array) -> jax.Array:
  """:func:`expand_words` built from two-way stacks along the last axis only (what the
  Pallas Triton lowering supports: ``tt.join``), for kernels that hash a tile's words."""
  l0, l1, l2, l3 = (lane_bits(words, U32(j)) for j in range(ELEMENTS_PER_WORD))
  even = jnp.stack([l0, l2], axis=-1)             # [..., k, t] = lane 2t
  odd = jnp.stack([l1, l3], axis=-1)              # [..., k, t] = lane 2t + 1
  lanes = jnp.stack([even, odd], axis=-1)         # [..., k, t, u] = lane 2t + u
  return lanes.reshape(words.shape[:-1] + (words.shape[-1] * ELEMENTS_PER_WORD,))


class SeedWords(NamedTuple):
  """A ``jax.random`` key already reduced to the two uint32 words that seed fp4jax's hash
  (what :func:`seed_from_key` makes of it). Accepted wherever a stochastic-rounding key
  is, with the same bits, so that a layer can derive all its keys' seeds in one batched
  computation (:func:`derived_seeds`) instead of one tiny kernel pair per key."""

  words: jax.Array  # uint32[2]


def seed_from_key(key: "jax.Array | SeedWords") -> jax.Array:
  """Two uint32 seed words from a ``jax.random`` key (typed or raw uint32[2]), or the
  words of a :class:`SeedWords`."""
  if isinstance(key, SeedWords):
    return jnp.asarray(key.words, U32)
  return jax.random.bits(key, (2,), U32)


def derived_seeds(key: jax.Array, indices: Sequence[int]) -> tuple[jax.Array, list[SeedWords]]:
  """``(keys, seeds)``: the typed keys ``fold_in(key, i)`` for each of ``indices`` (stacked)
  and their :class:`SeedWords`, from one batched ``fold_in`` and one batched draw: equal
  bit for bit to ``seed_from_key(fold_in(key, i))`` each (threefry works per counter, so
  a batch is the calls side by side)."""
  idx = jnp.asarray(list(indices), U32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx)
  words = jax.vmap(lambda k: jax.random.bits(k, (2,), U32))(keys)
  return keys, [SeedWords(words[j]) for j in range(len(indices))]


def element_counter(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every element (uint32; wraps above 2^32 elements)."""
  n = 1
  for d in shape:
    n *= d
  return jnp.arange(n, dtype=U32).reshape(shape)


def random_bits_for(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The stochastic-rounding words (uint32 of ``shape``) fp4jax uses under ``key``.

  When the last axis is a multiple of 4 the hashes are made once per word (four
  elements) and expanded where they are consumed, left to fuse on every platform. XLA's
  loop emitter then recomputes a word's hash for each of its four elements, yet on an
  H100 that fused element pass beat materialising the quarter-size words first (MXFP4 SR
  operand at 16384^2, element pass: 0.703 ms against 0.684 + 0.083), as on the CPU (26.5 against
  31.6 ms at 4096^2): kernels/NOTES.md, "Issue 18, seventh step". The Pallas kernels hash
  once per word in registers. The bits are the same either way."""
  seed = seed_from_key(key)
  shape = tuple(shape)
  if not (shape and shape[-1] % ELEMENTS_PER_WORD == 0):
    return element_bits_words(seed[0], seed[1], element_counter(shape))
  word_shape = shape[:-1] + (shape[-1] // ELEMENTS_PER_WORD,)
  return expand_words(counter_hash_words(seed[0], seed[1], element_counter(word_shape)))
