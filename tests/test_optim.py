"""The recipe's optimizer pieces: decay mask and learning-rate schedule."""
import jax
import jax.numpy as jnp
import numpy as np

from lvvit_jax import optim
from lvvit_jax.models import create_model


def test_weight_decay_mask_matches_spec():
  model = create_model('lvvit_t', img_size=32, patch_size=4, depth=2)
  params = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                             jnp.zeros((1, 32, 32, 3))))['params']
  mask = optim.weight_decay_mask(params)
  assert not mask['cls_token'] and not mask['pos_embed']
  assert mask['patch_embed']['conv1']['kernel'] and mask['patch_embed']['proj']['kernel']
  assert not mask['patch_embed']['proj']['bias'] and not mask['patch_embed']['bn1']['scale']
  assert mask['blocks_0']['attn']['qkv']['kernel'] and mask['aux_head']['kernel']
  assert not mask['blocks_0']['norm1']['scale'] and not mask['head']['bias']
  # Exactly the two embeddings are exempt among the leaves with ndim >= 2.
  leaves = jax.tree_util.tree_leaves_with_path(params)
  decayed = jax.tree_util.tree_leaves(mask)
  exempt = [jax.tree_util.keystr(p) for (p, leaf), d in zip(leaves, decayed)
            if leaf.ndim >= 2 and not d]
  assert sorted(exempt) == ["['cls_token']", "['pos_embed']"]
  assert not any(d for (_, leaf), d in zip(leaves, decayed) if leaf.ndim < 2)


def test_schedule_warmup_cosine_cooldown():
  sched = optim.lr_schedule(1.6e-3, total_steps=310, warmup_steps=5, init_lr=1e-6, end_lr=1e-5,
                            cooldown_steps=10)
  lrs = np.array([float(sched(s)) for s in range(311)])
  np.testing.assert_allclose(lrs[0], 1e-6, rtol=1e-5)
  np.testing.assert_allclose(lrs[5], 1.6e-3, rtol=1e-5)
  assert np.all(np.diff(lrs[:6]) > 0) and np.all(np.diff(lrs[5:301]) <= 1e-12)
  np.testing.assert_allclose(lrs[300:], 1e-5, rtol=1e-4)
