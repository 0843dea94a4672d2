"""A run directory (``--workdir``): the name of every file and folder that ``train.py`` and the commands after it
(``quantize``, ``predict``, ``convert``, ``evaluate``) write or read there, defined once. Imports nothing of the
project, so every module can ask it."""

import os

CHECKPOINTS = "checkpoints"            # orbax CheckpointManager: <workdir>/checkpoints/<step>
LOCK = ".lock"                         # the workdir lock of the process that writes (workdir_lock)
METRICS = "metrics.jsonl"              # one JSON object per line: train, eval, deploy
TENSORBOARD = "tensorboard"            # the same metrics for TensorBoard
LABELS = "labels.txt"                  # the class names, one per line in label order
INFERENCE = "inference.json"           # what the deploy model needs at inference (model, overrides, image size, ...)
DEPLOY = "deploy"                      # the fused deploy params (an orbax tree); convert --out writes it too
DEPLOY_ONNX = "deploy.onnx"            # the float ONNX graph, kept only once onnxruntime agrees with JAX
DEPLOY_INT8_ONNX = "deploy_int8.onnx"  # python -m repvgg_jax.quantize's INT8 graph, likewise checked
INT8_METRICS = "int8_metrics.json"     # quantize's float32 / PTQ / QAT accuracies and per-layer SQNR
W4A8_METRICS = "w4a8_metrics.json"     # the same for --weight_bits=4


def path(workdir: str, name: str) -> str:
  """``<workdir>/<name>``, ``name`` one of the names above."""
  return os.path.join(workdir, name)
