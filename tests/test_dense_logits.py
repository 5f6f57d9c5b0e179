"""The dense annotation of every model family agrees with its classifier once trained.

`model.apply(v, x, method='dense_logits')` is what a teacher writes as a score map; averaged over
positions it must name the class the eval logits name. For an NFNet that holds exactly at any
weights (a linear head commutes with the mean pool: tests/test_nfnet.py); for LV-ViT (aux head
on the patch tokens vs cls head + 0.5 max aux) and a plain ViT (its head on every patch token vs
on the class token) only a trained model makes the heads agree. So each demo-size model is
trained here, through the model contract alone, on a task it learns in a few dozen steps: the
class is the colour of a square at a random place and size on a noisy canvas.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ablation
from configs import demo
from lvvit_jax.models import create_model

pytestmark = pytest.mark.slow

SIZE, CLASSES = 64, 4
COLOURS = np.array([[1.5, -1.5, -1.5], [-1.5, 1.5, -1.5], [-1.5, -1.5, 1.5], [1.5, 1.5, -1.5]])


def _model_of(config):
  return config.model, dict(config.model_overrides)


# Demo-size models, as the configs build them: configs/demo.py's student, configs/ablation.py's
# ViT arms, and the CPU NFNet (the demo's teacher).
MODELS = {
    'lvvit': _model_of(demo.get_config('stage=student')),
    'vit_aux': _model_of(ablation.get_config('arm=vit_tl')),
    'vit_plain': _model_of(ablation.get_config('arm=vit_plain')),
    'nfnet': _model_of(demo.get_config('stage=teacher')),
}


def squares(n: int, seed: int):
  """(images (n, 64, 64, 3) float32, labels): a coloured square of 12-32 px on noise."""
  rng = np.random.default_rng(seed)
  images = rng.normal(0.0, 0.3, (n, SIZE, SIZE, 3)).astype(np.float32)
  labels = rng.integers(0, CLASSES, n)
  for image, label in zip(images, labels):
    side = rng.integers(12, 33)
    y, x = rng.integers(0, SIZE - side + 1, 2)
    image[y:y + side, x:x + side] += COLOURS[label]
  return images, labels


def train(model, steps=40, batch=16, lr=2e-3):
  """Adam on the image label: the cls head, and the token head (if any) on every token."""
  x0 = jnp.zeros((1, SIZE, SIZE, 3))
  variables = model.init({'params': jax.random.key(0)}, x0)
  params, rest = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  tx = optax.adam(lr)

  @jax.jit
  def step(params, rest, opt_state, images, labels, key):
    def loss_fn(p):
      (cls, aux), updates = model.apply({'params': p, **rest}, images, train=True,
                                        rngs={'dropout': key}, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(cls, labels).mean()
      if aux is not None:
        tokens = jnp.broadcast_to(labels[:, None], aux.shape[:2])
        loss += optax.softmax_cross_entropy_with_integer_labels(aux, tokens).mean()
      return loss, updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    changes, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, changes), {**rest, **updates}, opt_state, loss

  opt_state = tx.init(params)
  for i in range(steps):
    images, labels = squares(batch, seed=i)
    params, rest, opt_state, _ = step(params, rest, opt_state, images, labels,
                                      jax.random.key(i))
  return {'params': params, **rest}


@pytest.mark.parametrize('family', sorted(MODELS))
def test_dense_logits_averaged_give_the_eval_class_of_a_trained_model(family):
  name, overrides = MODELS[family]
  model = create_model(name, img_size=SIZE, num_classes=CLASSES, **overrides)
  variables = train(model)
  images, labels = squares(64, seed=10_000)
  logits, dense = jax.jit(lambda v, x: (model.apply(v, x),
                                        model.apply(v, x, method='dense_logits')))(variables,
                                                                                    images)
  assert logits.shape == (64, CLASSES) and logits.dtype == jnp.float32
  assert dense.shape == (64, *model.config.grid, CLASSES) and dense.dtype == jnp.float32
  eval_class = np.asarray(logits.argmax(-1))
  dense_class = np.asarray(dense.mean(axis=(1, 2)).argmax(-1))
  # Trained: the eval logits name the colour (chance is 25 %) ...
  assert (eval_class == labels).mean() >= 0.9, family
  # ... and the dense map, averaged over positions, names the same class.
  assert (dense_class == eval_class).mean() >= 0.95, family
