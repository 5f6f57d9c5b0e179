"""Orbax checkpoints of model variables (params and batch_stats), with the model's description.

A variables checkpoint is a folder:
    DIR/variables/   Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...}
    DIR/model.json   {"model": "lvvit_s", "overrides": {"num_classes": 1000, "img_size": 224}}
so that `create_model(meta['model'], **meta['overrides'])` rebuilds the module it belongs to.
The converter writes it; training and evaluation restore it (e.g. as an init checkpoint).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import orbax.checkpoint as ocp

MODEL_FILE = 'model.json'
VARIABLES_DIR = 'variables'


def save_variables(directory: str, variables: Mapping[str, Any], model_name: str,
                   overrides: Optional[Mapping[str, Any]] = None) -> str:
  """Writes `variables` and the model description under `directory` (created; must not exist)."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, VARIABLES_DIR)):
    raise FileExistsError(
        f'lvvit_jax/checkpoints.py: {directory}/{VARIABLES_DIR} already exists; choose a new '
        f'output directory or delete it.')
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, VARIABLES_DIR), dict(variables))
  checkpointer.wait_until_finished()
  with open(os.path.join(directory, MODEL_FILE), 'w') as f:
    json.dump({'model': model_name, 'overrides': dict(overrides or {})}, f, indent=2)
  return directory


def load_variables(directory: str, target: Any = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Returns (variables, model description) of a folder written by `save_variables`.

  `target` (e.g. the `jax.eval_shape` of the model's init, possibly with shardings) restores
  straight into that structure and placement; without it arrays come back as written.
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, MODEL_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f'lvvit_jax/checkpoints.py: {meta_path} not found; {directory} is not a variables '
        f'checkpoint (write one with `python -m lvvit_jax.convert`).')
  with open(meta_path) as f:
    meta = json.load(f)
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR), target)
  return variables, meta
