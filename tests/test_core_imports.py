"""The core (models, token labeling, optimizer, checkpoints) imports without TensorFlow/PyTorch.

Accelerator machines stay lean: only the input pipeline and labelgen need TensorFlow, and only
the checkpoint converter needs PyTorch (imported lazily when a file is read).
"""
import subprocess
import sys

CORE = ['lvvit_jax', 'lvvit_jax.models', 'lvvit_jax.models.lvvit', 'lvvit_jax.models.convert',
        'lvvit_jax.token_labeling', 'lvvit_jax.optim', 'lvvit_jax.checkpoints',
        'lvvit_jax.convert', 'lvvit_jax.augment', 'lvvit_jax.train',
        'lvvit_jax.sharding', 'lvvit_jax.evaluate', 'lvvit_jax.metrics',
        'lvvit_jax.preemption', 'lvvit_jax.token_labeling.objective']


def test_core_imports_with_tensorflow_and_torch_blocked():
  # A None entry in sys.modules makes any `import tensorflow` raise ImportError.
  code = ('import sys\n'
          'for m in ("tensorflow", "tensorflow_datasets", "torch"): sys.modules[m] = None\n'
          + ''.join(f'import {m}\n' for m in CORE) +
          'from lvvit_jax.models import create_model\n'
          'create_model("lvvit_t")\n'
          'print("ok")\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith('ok')
