"""Masked top-1 / top-5 accuracy over an eval iterator, on the mesh.

Eval batches come padded to full size with a `mask` (False for padding), and every process
yields the same number of batches, so each example is counted exactly once. Labels are either
`label` (B,) or `labels` (B, L) with -1 padding: several correct classes per example, as in
ImageNet-ReaL, where a prediction is right if it is any of them and examples without a label
are not counted. Counts accumulate on the devices; the host reads them once at the end.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax import sharding


def topk_hits(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> Dict[str, jax.Array]:
  """Summed top-1 / top-5 hits and the number of counted examples of one batch (int32)."""
  if labels.ndim == 1:
    labels = labels[:, None]
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)                          # (B, k)
  valid_label = labels >= 0                                  # (B, L)
  hit = (top[:, :, None] == labels[:, None, :]) & valid_label[:, None, :]   # (B, k, L)
  counted = mask & jnp.any(valid_label, axis=-1)
  hit1 = jnp.any(hit[:, 0], axis=-1) & counted
  hit5 = jnp.any(hit, axis=(1, 2)) & counted
  return {'top1': jnp.sum(hit1, dtype=jnp.int32), 'top5': jnp.sum(hit5, dtype=jnp.int32),
          'count': jnp.sum(counted, dtype=jnp.int32)}


def make_eval_step(predict: Callable[[Any, jax.Array], jax.Array]):
  """`(variables, batch, totals) -> totals`: adds one batch's hits to running device totals.

  `predict(variables, images)` returns (B, K) logits (the model's inference output).
  """
  def eval_step(variables, batch, totals):
    labels = batch['labels'] if 'labels' in batch else batch['label']
    hits = topk_hits(predict(variables, batch['image']), labels, batch['mask'])
    return jax.tree.map(jnp.add, totals, hits)
  return eval_step


def evaluate(eval_step: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: jax.sharding.Mesh, *, num_batches: Optional[int] = None,
             desc: str = 'eval', progress: bool = True) -> Dict[str, float]:
  """Runs a jitted `eval_step` over host `batches`; returns top1, top5 (fractions) and count."""
  totals = {k: sharding.put(np.int32(0), sharding.replicated(mesh))
            for k in ('top1', 'top5', 'count')}
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num_batches, desc=desc, unit='batch', file=sys.stderr, leave=False,
               mininterval=2.0)
  for batch in batches:
    totals = eval_step(variables, sharding.host_to_global(batch, mesh), totals)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  totals = sharding.fetch(totals)
  count = int(totals['count'])
  return {'top1': int(totals['top1']) / max(count, 1), 'top5': int(totals['top5']) / max(count, 1),
          'count': count}
