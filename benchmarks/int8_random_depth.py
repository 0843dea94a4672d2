"""Why the INT8 graph is checked on shallow random networks and on trained deep ones: random networks become
chaotic with depth. Prints, for random well-posed D2se networks (tests/wellposed.py) of growing depth,
onnxruntime's INT8 logits vs the JAX fake-quantized ones, and how far the float and the fake-quantized JAX
models themselves move under input noise of 1e-4 (all as fractions of the logits' spread over 32 images).

  python benchmarks/int8_random_depth.py
"""

import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import repvgg_jax as rv  # pylint: disable=wrong-import-position
from repvgg_jax import export, quantization  # pylint: disable=wrong-import-position
from tests import wellposed  # pylint: disable=wrong-import-position

DEPTHS = ((1, 1, 1, 1), (2, 2, 2, 1), (4, 4, 8, 1), (8, 14, 24, 1))  # The last is D2se's own.
NOISE = 1e-4


def main():
  print("| D2se blocks per stage | blocks | onnxruntime vs JAX INT8 | JAX INT8 under noise | float under noise |")
  print("|---|---|---|---|---|")
  images = wellposed.images((32, 32, 32, 3), 7).astype(np.float32)
  noisy = images + NOISE * np.random.default_rng(1).normal(size=images.shape).astype(np.float32)
  for num_blocks in DEPTHS:
    overrides = dict(num_classes=10, width_multiplier=(0.25, 0.25, 0.25, 0.5), num_blocks=num_blocks)
    model = rv.create_model("RepVGG-D2se", **overrides)
    deploy = rv.create_model("RepVGG-D2se", deploy=True, **overrides)
    variables = wellposed.well_posed_variables(model, (32, 32, 3), dtype=np.float32)
    params = rv.reparam(variables["params"], variables["batch_stats"])
    qmodel = quantization.fake_quantized(deploy)
    stats = quantization.calibrate(qmodel, params, [wellposed.images((16, 32, 32, 3), s).astype(np.float32)
                                                for s in (1, 2)])
    proto = export.to_onnx(deploy, jax.device_get(params), int8=quantization.int8_layers(params, stats))
    expected = np.asarray(quantization.logits(qmodel, params, stats, images))
    onnx = export.onnx_session(proto).run(["logits"], {"images": images.transpose(0, 3, 1, 2)})[0]
    jax_noisy = np.asarray(quantization.logits(qmodel, params, stats, noisy))
    float_clean, float_noisy = (np.asarray(deploy.apply({"params": params}, x)) for x in (images, noisy))
    print(f"| {num_blocks} | {1 + sum(num_blocks)} | {wellposed.spread_error(onnx, expected):.3f} | "
          f"{wellposed.spread_error(jax_noisy, expected):.3f} | {wellposed.spread_error(float_noisy, float_clean):.4f} |")


if __name__ == "__main__":
  main()
