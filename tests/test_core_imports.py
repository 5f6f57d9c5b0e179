"""The core (models, token labeling, optimizer, checkpoints) imports without TensorFlow/PyTorch.

Accelerator machines stay lean: only the input pipeline and labelgen need TensorFlow, and only
the checkpoint converter needs PyTorch (imported lazily when a file is read).
"""
import os
import subprocess
import sys

CORE = ['lvvit_jax', 'lvvit_jax.models', 'lvvit_jax.models.lvvit', 'lvvit_jax.models.convert',
        'lvvit_jax.token_labeling', 'lvvit_jax.optim', 'lvvit_jax.checkpoints',
        'lvvit_jax.convert', 'lvvit_jax.augment', 'lvvit_jax.train',
        'lvvit_jax.sharding', 'lvvit_jax.evaluate', 'lvvit_jax.metrics',
        'lvvit_jax.preemption', 'lvvit_jax.token_labeling.objective',
        'lvvit_jax.models.nfnet', 'lvvit_jax.models.nfnet_convert', 'lvvit_jax.safe_pickle',
        'lvvit_jax.cli', 'lvvit_jax.plots']


def test_core_imports_with_tensorflow_and_torch_blocked():
  # A None entry in sys.modules makes any `import tensorflow` raise ImportError.
  code = ('import sys\n'
          'for m in ("tensorflow", "tensorflow_datasets", "torch"): sys.modules[m] = None\n'
          + ''.join(f'import {m}\n' for m in CORE) +
          'from lvvit_jax.models import create_model\n'
          'create_model("lvvit_t")\n'
          'create_model("nfnet_f0")\n'
          'print("ok")\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith('ok')


def test_tensorflow_onednn_kernels_default_off_and_overridable():
  # lvvit_jax sets TF_ENABLE_ONEDNN_OPTS=0 before TensorFlow starts (faster input pipeline),
  # unless the user chose a value; labelgen imports it first too.
  code = ('import os\n'
          'import labelgen.generate\n'
          'import tensorflow\n'
          'print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"))\n')
  for preset, expected in ((None, '0'), ('1', '1')):
    env = {k: v for k, v in os.environ.items() if k != 'TF_ENABLE_ONEDNN_OPTS'}
    if preset is not None:
      env['TF_ENABLE_ONEDNN_OPTS'] = preset
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected
    assert ('oneDNN custom operations are on' in out.stderr) == (expected == '1')
