"""The benchmark scripts run and print their figures (tiny sizes: a check against rot, not timing)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_model_step_prints_throughput_and_tflops():
  out = _run('-m', 'benchmarks.model_step', '--model', 'lvvit_t', '--img-size', '64', '--batch',
             '2', '--num-classes', '10', '--dtype', 'float32', '--steps', '1', '--warmup', '1')
  rows = re.findall(r'^(forward|forward\+backward) +([0-9.]+) +([0-9.]+) +([0-9.]+)$', out,
                    re.M)
  assert [r[0] for r in rows] == ['forward', 'forward+backward'], out
  assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows), out


@pytest.mark.slow
def test_token_targets_benchmark_prints_the_share_of_the_step():
  out = _run('-m', 'benchmarks.token_targets', '--batch', '4', '--model-batch', '2',
             '--num-classes', '10', '--grid', '4', '--map', '6', '--k', '3',
             '--model', 'lvvit_t', '--steps', '1', '--warmup', '1')
  assert re.search(r'targets\[scatter\] \+ MixToken = [0-9.]+% of the lvvit_t step', out), out


@pytest.mark.slow
def test_labelgen_benchmark_prints_images_per_second_and_bytes_per_image():
  out = _run('-m', 'benchmarks.labelgen', '--model', 'lvvit_t', '--size', '32', '--images', '8',
             '--batch', '4', '--num-classes', '10', '--steps', '1')
  rates = re.findall(r'^(teacher step|labelgen generate) .*? ([0-9.]+) images/s', out, re.M)
  assert [r[0] for r in rates] == ['teacher step', 'labelgen generate'], out
  assert all(float(r[1]) > 0 for r in rates), out
  # 2x2 maps of top-5 float16 logits and int16 indices: 80 bytes of map per image, plus the
  # record's key, label and box.
  per_image = re.search(r'^score maps 2x2 x top-5 +([0-9]+) bytes per image$', out, re.M)
  assert per_image and 80 < int(per_image[1]) < 1000, out
  assert re.search(r'^device: cpu ', out, re.M), out


@pytest.mark.slow
def test_input_pipeline_benchmark_prints_the_ratios_and_the_device_share():
  out = _run('-m', 'benchmarks.input_pipeline', '--num-images', '16', '--timed', '16',
             '--batch', '8', '--repeats', '1', '--image-size', '64', '--model', 'lvvit_t',
             '--device-batch', '8', '--step-batch', '4', '--steps', '1')
  rows = re.findall(r'^(train host path \+ score maps|train, PIL reference \(full aug\.\)|'
                    r'decode only, same files \(ceiling\)|eval \(resize, centre crop\)) +'
                    r'([0-9]+) +([0-9.]+) +([0-9.]+)$', out, re.M)
  assert {(r[0].split(' ')[0], r[1]) for r in rows} >= {('train', '1'), ('decode', '1'),
                                                          ('eval', '1')}, out
  assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows), out
  assert re.search(r"^train host path / PIL reference, per CPU-second, one thread: [0-9.]+x "
                   r"\(target >= 2x\); resize='pil': [0-9.]+x; resize='plain': [0-9.]+x$",
                   out, re.M), out
  assert re.search(r'^budget: PIL reference [0-9.]+ CPU-ms per image', out, re.M), out
  psnr = re.search(r'^resize quality, .*\(n=([0-9]+)\): pil bilinear ([0-9.]+) dB, pil bicubic '
                   r'([0-9.]+) dB, area ([0-9.]+) dB, plain bilinear', out, re.M)
  assert psnr and int(psnr[1]) > 0 and all(20 < float(db) < 80 for db in psnr.groups()[1:]), out
  assert re.search(r'^device augmentation = [0-9.]+% of the lvvit_t training step at batch 8',
                   out, re.M), out


@pytest.mark.slow
def test_train_step_benchmark_prints_images_per_second_mfu_and_the_torch_ratio():
  # One JAX row (each is a compile of the whole step) next to PyTorch's; --dim narrows the
  # blocks (LV-ViT-T's 240 in heads of 60 -> 120 in 2 heads) for both.
  out = _run('-m', 'benchmarks.train_step', '--model', 'lvvit_t', '--img-size', '32',
             '--batch', '4', '--num-classes', '10', '--steps', '1', '--warmup', '1',
             '--variants', 'token-noaug', '--dim', '120')
  assert re.search(r'^device: cpu cpu x\d+ \(.+, \d+ cores.*\) \| lvvit_t@32 batch 4 stem default '
                   r'dim 120 \|', out, re.M), out
  rows = re.findall(r'^(JAX: [a-z ,]+?|PyTorch .*?) +([0-9.]+) +([0-9]+) ', out, re.M)
  assert [r[0] for r in rows] == ['JAX: token labels, no augmentation',
                                  'PyTorch (tests/torch_lvvit.py), fwd+bwd+AdamW'], out
  assert all(float(r[1]) > 0 for r in rows), out
  mfu = re.findall(r' ([0-9.]+)%$', out, re.M)
  assert len(mfu) == 1 and float(mfu[0]) > 0, out
  assert re.search(r'^ratio JAX \(token labels, no augmentation\) / PyTorch \(the same work\): '
                   r'[0-9.]+x$', out, re.M), out


@pytest.mark.slow
def test_checkpoint_save_benchmark_prints_blocked_and_background_seconds():
  out = _run('-m', 'benchmarks.checkpoint_save', '--model', 'lvvit_t', '--img-size', '32',
             '--num-classes', '10', '--saves', '2')
  secs = dict(re.findall(r'^(blocked in the loop|in the background|whole save)\D*? +'
                         r'([0-9.]+) s', out, re.M))
  assert set(secs) == {'blocked in the loop', 'in the background', 'whole save'}, out
  assert float(secs['whole save']) > 0, out


@pytest.mark.slow
def test_target_quality_scores_the_maps_and_the_teacher_on_each_crop(digits_data, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lvvit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from lvvit_jax.models import create_model  # pylint: disable=g-import-not-at-top
  from tests.run_helpers import write_label_maps  # pylint: disable=g-import-not-at-top
  # Maps whose top class is the label on every cell: every crop's targets name it. A random
  # teacher at another size and grid (32 px, 4x4) runs on the student's 64 px crops.
  maps = write_label_maps(digits_data['train'], str(tmp_path / 'maps'), grid=(8, 8), k=3)
  cfg = dict(img_size=32, num_classes=10, depth=1, patch_size=8, dim=48, num_heads=2,
             mlp_hidden=96, stem_channels=16)
  model = create_model('lvvit_t', **cfg)
  variables = model.init({'params': jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
  teacher = str(tmp_path / 'teacher')
  checkpoints.save_variables(teacher, jax.tree.map(np.asarray, variables), 'lvvit_t', cfg)
  os.symlink(digits_data['data_dir'], str(tmp_path / 'data'))
  out = _run('-m', 'benchmarks.target_quality', '--config',
             f'configs/demo.py:stage=student,root={tmp_path}', '--maps', maps,
             '--teacher', teacher, '--batches', '2', '--batch-size', '8',
             '--workdir', str(tmp_path))
  assert '16 training crops (token grid (8, 8))' in out, out
  rows = dict((m[0], (float(m[1]), float(m[2]))) for m in re.findall(
      r'^([a-z()| ]+?) +([0-9.]+) +([0-9.]+)$', out, re.M))
  assert rows['cls names the label'][0] == 1.0 and rows['tokens name the label'][0] == 1.0, out
  assert rows['tokens p(label)'][0] > 0.5, out
  agree = float(re.search(r'maps and the teacher on the crop: ([0-9.]+)$', out, re.M)[1])
  # The maps always name the label, so the teacher agrees with them exactly where it does.
  assert agree == rows['tokens name the label'][1], out


@pytest.mark.slow
def test_head_accuracy_splits_the_inference_rule_into_its_heads(digits_data, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from lvvit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from lvvit_jax import recipe  # pylint: disable=g-import-not-at-top
  config = demo.get_config(f'stage=student,root={tmp_path}')
  # A checkpoint of the training size; the benchmark evaluates it at the eval size (96 px).
  size = config.img_size
  model = recipe.build_model(config)
  variables = jax.tree.map(np.asarray, model.init({'params': jax.random.key(0)},
                                                  jnp.zeros((1, size, size, 3))))
  os.symlink(digits_data['data_dir'], str(tmp_path / 'data'))
  fields = {k: v for k, v in config.model_overrides.items()}
  fields.update(img_size=size, num_classes=10)

  def top1s(zeroed):
    params = jax.tree.map(np.copy, variables['params'])
    params[zeroed] = jax.tree.map(np.zeros_like, params[zeroed])
    ckpt = str(tmp_path / f'no_{zeroed}')
    checkpoints.save_variables(ckpt, dict(variables, params=params), config.model, fields)
    out = _run('-m', 'benchmarks.head_accuracy', '--config',
               f'configs/demo.py:stage=student,root={tmp_path}', '--checkpoint', ckpt,
               '--workdir', str(tmp_path))
    rows = re.findall(r'^val +(.+?) +top-1 +([0-9.]+) % +\(360 examples\)$', out, re.M)
    assert [r[0] for r in rows] == ['cls + 0.5 * max aux (inference)', 'cls head alone',
                                    'aux head alone (max over tokens)'], out
    return [float(r[1]) for r in rows]

  val = digits_data['validation']
  labels = [int(ex['label']) for i in range(len(val.shards))
            for ex in val.shard_dataset(i).as_numpy_iterator()]
  share_of_class_0 = round(100 * labels.count(0) / len(labels), 1)
  both, cls_alone, aux_alone = top1s('aux_head')  # aux logits all 0: the rule is the cls head
  assert both == cls_alone and aux_alone == share_of_class_0
  both, cls_alone, aux_alone = top1s('head')  # cls logits all 0: the rule is the aux max
  assert both == aux_alone and cls_alone == share_of_class_0
