"""The demo job: a short LV-ViT training run on scikit-learn's bundled digits, on any device.

The 1,797 8x8 digit images ship inside scikit-learn, so the run needs no download. They are
upsampled to `config.img_size` and fed to a small-patch LV-ViT (the stem keeps its 7x7/2 and
two 3x3 convs; `proj` has stride patch_size / 2). Every step is the method's: MixToken with a
traced box, smoothed label targets for the cls token and every patch token (plain labels: no
score maps for digits), the token-labeling loss, AdamW with the recipe's decay mask,
warm-up + cosine schedule. Metrics go to stdout and to clu metric writers in the workdir.
"""
from __future__ import annotations

import time
from typing import Any, Dict

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lvvit_jax import optim
from lvvit_jax import token_labeling as tl
from lvvit_jax.models import create_model

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_digits(img_size: int, seed: int) -> Dict[str, np.ndarray]:
  """Digits as normalised NHWC float32 images of img_size, split 80/20 (seeded)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) / 16.0  # (n, 8, 8) in [0, 1]
  images = np.asarray(jax.image.resize(images, (len(images), img_size, img_size), 'bilinear'))
  images = (np.repeat(images[..., None], 3, axis=-1) - MEAN) / STD
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_train = int(0.8 * len(order))
  return {'train_images': images[order[:n_train]], 'train_labels': labels[order[:n_train]],
          'test_images': images[order[n_train:]], 'test_labels': labels[order[n_train:]]}


def make_train_step(model, tx, config: ml_collections.ConfigDict):
  """The pure update step `(params, batch_stats, opt_state, images, labels, rng) -> ...`."""
  grid = model.config.grid
  num_classes = model.config.num_classes

  def loss_fn(params, batch_stats, images, labels, rng):
    box_rng, drop_rng = jax.random.split(rng)
    box = tl.sample_mix_box(box_rng, grid)
    cls_target, token_target = tl.label_targets(labels, grid=grid, num_classes=num_classes,
                                                smoothing=config.smoothing)
    cls_target = tl.mix_targets(cls_target, box, grid)
    (cls_logits, aux_logits), updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mix_box=box,
        rngs={'dropout': drop_rng}, mutable=['batch_stats'])
    total, parts = tl.token_label_loss(
        cls_logits, aux_logits, cls_target,
        token_target.reshape(token_target.shape[0], -1, num_classes),
        dense_weight=config.dense_weight)
    return total, (updates['batch_stats'], parts)

  def step(params, batch_stats, opt_state, images, labels, rng):
    (loss, (batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': loss, 'loss_cls': parts['cls'], 'loss_dense': parts['dense'],
               'grad_norm': optax.global_norm(grads)}
    return params, batch_stats, opt_state, metrics

  return step


def evaluate(predict, variables, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> float:
  """Top-1 accuracy of `predict(variables, images) -> classes` over every example."""
  correct = 0
  for i in range(0, len(labels), batch_size):
    x = images[i:i + batch_size]
    pad = batch_size - len(x)  # Pad the last batch so the step keeps one shape.
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    pred = np.asarray(predict(variables, x))[:batch_size - pad]
    correct += int((pred == labels[i:i + batch_size]).sum())
  return correct / len(labels)


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains for config.total_steps and returns the final metrics."""
  data = load_digits(config.img_size, config.seed)
  model = create_model(config.model, num_classes=10, img_size=config.img_size,
                       patch_size=config.patch_size, dtype=config.dtype,
                       **config.get('model_overrides', {}))
  rng = jax.random.key(config.seed)
  init_rng, rng = jax.random.split(rng)
  variables = jax.jit(model.init)({'params': init_rng}, data['train_images'][:2])
  params, batch_stats = variables['params'], variables['batch_stats']
  schedule = optim.lr_schedule(config.lr, config.total_steps, config.warmup_steps,
                               end_lr=config.lr * 0.01)
  tx = optim.adamw(schedule, params, weight_decay=config.weight_decay)
  opt_state = tx.init(params)
  step = jax.jit(make_train_step(model, tx, config), donate_argnums=(0, 1, 2))

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  n = len(data['train_labels'])
  order_rng = np.random.default_rng(config.seed)
  order = order_rng.permutation(n)
  cursor, t0 = 0, time.perf_counter()
  for i in range(1, config.total_steps + 1):
    if cursor + config.batch_size > n:
      order, cursor = order_rng.permutation(n), 0
    idx = order[cursor:cursor + config.batch_size]
    cursor += config.batch_size
    params, batch_stats, opt_state, metrics = step(
        params, batch_stats, opt_state, data['train_images'][idx], data['train_labels'][idx],
        jax.random.fold_in(rng, i))
    if i % config.log_every == 0 or i == config.total_steps:
      metrics = jax.device_get(metrics)
      metrics['lr'] = float(schedule(i))
      metrics['steps_per_sec'] = config.log_every / (time.perf_counter() - t0)
      writer.write_scalars(i, metrics)
      print(f'step {i:4d}  loss {metrics["loss"]:.4f}  (cls {metrics["loss_cls"]:.4f}, '
            f'dense {metrics["loss_dense"]:.4f})  lr {metrics["lr"]:.2e}', flush=True)
      t0 = time.perf_counter()
  variables = {'params': params, 'batch_stats': batch_stats}
  # The inference output (cls + 0.5 * max aux), compiled once for both splits.
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), axis=-1))
  result = {'test_accuracy': evaluate(predict, variables, data['test_images'],
                                      data['test_labels'], config.batch_size),
            'train_accuracy': evaluate(predict, variables, data['train_images'],
                                       data['train_labels'], config.batch_size),
            'final_loss': float(metrics['loss'])}
  writer.write_scalars(config.total_steps, result)
  writer.flush()
  print(f'digits test accuracy {result["test_accuracy"]:.3f} (train '
        f'{result["train_accuracy"]:.3f}) after {config.total_steps} steps', flush=True)
  logging.info('demo result: %s', result)
  return result
