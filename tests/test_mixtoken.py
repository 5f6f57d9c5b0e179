"""MixToken: the box distribution, the swap and its undo, target mixing, and shard locality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lvvit_jax import token_labeling as tl

GRID = (5, 7)


def _tokens(b=6, grid=GRID, d=3):
  """Token i of example e holds (e, row, col, ...): every swap is visible."""
  e = np.arange(b)[:, None, None, None]
  r = np.arange(grid[0])[None, :, None, None]
  c = np.arange(grid[1])[None, None, :, None]
  ch = np.arange(d)[None, None, None, :]
  return jnp.asarray(1000.0 * e + 100.0 * r + 10.0 * c + ch, jnp.float32)


def _owner(mixed):
  return np.asarray(mixed[..., 0] // 1000).astype(int)  # which example a token came from


BOXES = [(1, 2, 4, 6), (0, 0, 5, 7), (3, 3, 3, 6), (2, 5, 2, 5), (4, 0, 5, 1), (0, 6, 5, 7)]


@pytest.mark.parametrize('box', BOXES)
def test_swap_fraction_is_one_minus_lam_and_unmix_undoes_mix(box):
  b = 6
  x = _tokens(b)
  box = jnp.asarray(box, jnp.int32)
  mixed = jax.jit(tl.mix_tokens)(x, box)
  owner = _owner(mixed)
  own = np.arange(b)[:, None, None]
  partner = own ^ 1  # pairs (0, 1), (2, 3), (4, 5)
  assert np.all((owner == own) | (owner == partner))
  # Swapped tokens stay at their grid position.
  np.testing.assert_array_equal(np.asarray(mixed) % 1000, np.asarray(x) % 1000)
  n = GRID[0] * GRID[1]
  one_hot = jax.nn.one_hot(jnp.arange(b), b)
  mixed_cls = tl.mix_targets(one_hot, box, GRID)
  lam = np.asarray(mixed_cls)[np.arange(b), np.arange(b)]
  swapped = (owner != own).reshape(b, -1).mean(-1)
  np.testing.assert_allclose(swapped, 1.0 - lam, atol=1e-7, rtol=0)
  np.testing.assert_allclose(np.asarray(mixed_cls)[np.arange(b), partner[:, 0, 0]],
                             swapped, atol=1e-7, rtol=0)
  area = (box[2] - box[0]) * (box[3] - box[1])
  np.testing.assert_allclose(swapped, float(area) / n, atol=1e-7, rtol=0)
  np.testing.assert_array_equal(jax.jit(tl.unmix_tokens)(mixed, box), x)


@pytest.mark.parametrize('box', [(3, 3, 3, 6), (0, 0, 0, 0), (2, 4, 5, 4), (5, 7, 9, 9)])
def test_empty_box_changes_nothing(box):
  x = _tokens()
  box = jnp.asarray(box, jnp.int32)
  np.testing.assert_array_equal(tl.mix_tokens(x, box), x)
  t = jax.nn.softmax(jax.random.normal(jax.random.key(0), (6, 4)))
  np.testing.assert_array_equal(tl.mix_targets(t, box, GRID), t)


def test_box_beyond_the_grid_is_mixed_by_its_clipped_area():
  t = jax.nn.one_hot(jnp.arange(4), 4)
  clipped = tl.mix_targets(t, jnp.asarray((3, 5, 9, 12), jnp.int32), GRID)  # 2 x 2 inside
  np.testing.assert_allclose(clipped[0], [1 - 4 / 35, 4 / 35, 0, 0], atol=1e-7)


def test_odd_batch_keeps_the_last_example():
  x = _tokens(b=5)
  mixed = tl.mix_tokens(x, jnp.asarray((0, 0, 5, 7), jnp.int32))
  np.testing.assert_array_equal(_owner(mixed)[:, 0, 0], [1, 0, 3, 2, 4])


def test_sample_mix_box_follows_the_spec_and_never_recompiles():
  grid = 14
  traces = []

  def draws(key):
    """The box and, from the same key, SPEC section 4's lambda and centre."""
    k_lam, k_row, k_col = jax.random.split(key, 3)
    return (tl.sample_mix_box(key, grid), jax.random.beta(k_lam, 1.0, 1.0),
            jax.random.randint(k_row, (), 0, grid), jax.random.randint(k_col, (), 0, grid))

  @jax.jit
  def sample(keys):
    traces.append(1)
    return jax.vmap(draws)(keys)

  keys = jax.random.split(jax.random.key(0), 400)
  halves = [jax.tree.map(np.asarray, sample(k)) for k in (keys[:200], keys[200:])]
  assert len(traces) == 1  # new keys (new boxes) reuse the compiled step
  boxes, lams, cys, cxs = (np.concatenate(parts) for parts in zip(*halves))
  assert boxes.dtype == np.int32 and boxes.shape == (400, 4)
  r0, c0, r1, c1 = boxes.T
  assert np.all((0 <= r0) & (r0 <= r1) & (r1 <= grid) & (0 <= c0) & (c0 <= c1) & (c1 <= grid))
  # Unclipped boxes on a square grid are square.
  inner = (r0 > 0) & (r1 < grid) & (c0 > 0) & (c1 < grid)
  assert inner.sum() > 50
  np.testing.assert_array_equal((r1 - r0)[inner], (c1 - c0)[inner])
  # Empty boxes occur (lambda near 1 or clipping), and large ones too.
  areas = (r1 - r0) * (c1 - c0)
  assert (areas == 0).any() and (areas >= 100).any()
  # Side int(g * sqrt(1 - lam)) around a uniform centre, clipped to the grid.
  for box, lam, cy, cx in zip(boxes, lams, cys, cxs):
    side = int(np.float32(grid) * np.sqrt(np.float32(1.0) - lam))  # float32, as traced
    want = [max(cy - side // 2, 0), max(cx - side // 2, 0),
            min(cy - side // 2 + side, grid), min(cx - side // 2 + side, grid)]
    np.testing.assert_array_equal(box, want)


def test_vmap_over_boxes_and_grad():
  x = _tokens(b=4)
  boxes = jnp.asarray([(0, 0, 2, 2), (1, 1, 5, 7)], jnp.int32)
  stacked = jnp.stack([x, x + 0.5])
  out = jax.vmap(tl.mix_tokens)(stacked, boxes)
  for i in range(2):
    np.testing.assert_array_equal(out[i], tl.mix_tokens(stacked[i], boxes[i]))
  # The swap is a symmetric permutation: the gradient of <w, mix(x)> is mix(w).
  w = jax.random.normal(jax.random.key(1), x.shape)
  box = boxes[1]
  grad = jax.jit(jax.grad(lambda t: jnp.sum(w * tl.mix_tokens(t, box))))(x)
  np.testing.assert_allclose(grad, tl.mix_tokens(w, box), atol=0)


def test_partners_never_cross_a_device_shard():
  devices = jax.devices()
  # tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax starts.
  assert len(devices) >= 4, 'needs 4 devices: run through pytest so tests/conftest.py applies'
  mesh = Mesh(np.asarray(devices[:4]), ('data',))
  sharded = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  x = _tokens(b=8)
  box = jnp.asarray((1, 2, 4, 6), jnp.int32)
  fn = jax.jit(tl.mix_tokens, in_shardings=(sharded, replicated), out_shardings=sharded)
  xs = jax.device_put(x, sharded)
  out = fn(xs, box)
  np.testing.assert_array_equal(out, tl.mix_tokens(x, box))
  hlo = fn.lower(xs, box).compile().as_text().lower()
  for op in ('all-gather', 'all-to-all', 'collective-permute', 'all-reduce', 'reduce-scatter'):
    assert op not in hlo, f'mix_tokens moves data between devices: {op} in the compiled HLO'
  # Each device's output holds only its own examples.
  for shard in out.addressable_shards:
    rows = np.arange(8)[shard.index[0]]
    assert set(_owner(shard.data).ravel()) <= set(rows)
