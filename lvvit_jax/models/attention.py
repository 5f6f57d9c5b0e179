"""Multi-head self-attention's core, softmax(q k^T * scale) v, with a CPU lowering.

`multi_head(qkv, num_heads)` takes the qkv projection's output (B, N, 3 * D), laid out
(3, heads, head_dim) on its last axis as in the released models, and returns the heads'
outputs merged back to (B, N, D). On accelerators it is `jax.nn.dot_product_attention`.

On XLA:CPU that function is slow for ViT-sized sequences: its scores (B, heads, Nq, Nk) take the
softmax along their minor axis, a row of 65 to 197 keys that XLA:CPU's reductions vectorise
badly, and its batched products carry two batch axes. The CPU lowering computes the same
function with the heads folded into one batch axis (B * heads) and the scores transposed, keys
before queries: the softmax then reduces along a major axis (vectorised over the queries) and
the second product contracts the keys with the values directly. Plain autodiff of it is the
backward; the sums are the same up to their order in float32. Measured (benchmarks/results/
train_step_cpu.txt, Intel CPU): forward + backward of the attention alone, the demo's blocks
(64 x 65 tokens, 4 heads of 32) 12.5 -> 9.2 ms, LV-ViT-S's at 224 px, batch 8, 31.5 -> 21.0 ms;
in the whole training step lvvit_s 1.04-1.055x but the demo model 1.00x (inside the whole
model XLA had already folded most of what this saves alone), the demo model's eval forward at
96 px 1.12-1.13x.

It is used on the CPU backend for float32 inputs only (`lowering.lowering()`; other dtypes keep
jax.nn's float32 logits and its dtype handling); accelerators keep XLA's attention.
"""
from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from lvvit_jax.models.lowering import lowering

# lax.dot_general dimension numbers over (batch, rows, columns) operands.
_ROWS_BY_ROWS = (((2,), (2,)), ((0,), (0,)))    # x y^T: contract the columns
_COLS_BY_ROWS = (((1,), (1,)), ((0,), (0,)))    # x^T y: contract the rows


def split_heads(qkv: jax.Array, num_heads: int) -> jax.Array:
  """(B, N, 3 * D) -> (3, B * heads, N, head_dim): q, k, v with the heads in the batch."""
  b, n, d3 = qkv.shape
  head_dim = d3 // (3 * num_heads)
  x = qkv.reshape(b, n, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
  return x.reshape(3, b * num_heads, n, head_dim)


def merge_heads(out: jax.Array, batch: int) -> jax.Array:
  """(B * heads, N, head_dim) -> (B, N, heads * head_dim)."""
  bh, n, head_dim = out.shape
  heads = bh // batch
  return out.reshape(batch, heads, n, head_dim).transpose(0, 2, 1, 3).reshape(
      batch, n, heads * head_dim)


def keys_major(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
  """softmax(q k^T * scale) v over (batch, N, head_dim) operands, the scores held (batch, Nk,
  Nq): the softmax reduces over axis 1."""
  scores_t = lax.dot_general(k, q, _ROWS_BY_ROWS) * jnp.asarray(scale, q.dtype)
  probs_t = jax.nn.softmax(scores_t, axis=1)
  return lax.dot_general(probs_t, v, _COLS_BY_ROWS)


def multi_head(qkv: jax.Array, num_heads: int) -> jax.Array:
  """The attention of (B, N, 3 * D) qkv projections with `num_heads` heads: (B, N, D)."""
  b, n, d3 = qkv.shape
  head_dim = d3 // (3 * num_heads)
  scale = head_dim ** -0.5
  if lowering() == 'matmul' and qkv.dtype == jnp.float32:
    q, k, v = split_heads(qkv, num_heads)
    return merge_heads(keys_major(q, k, v, scale), b)
  # (B, N, heads, head_dim) each: jax.nn's layout.
  q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, num_heads, head_dim), 2, 0)
  return jax.nn.dot_product_attention(q, k, v, scale=scale).reshape(b, n, d3 // 3)
