"""Export of the plain (deploy) model: a serialized ``jax.export`` artifact (StableHLO), and an ONNX graph.

The ``jax.export`` artifact holds the weights and the computation, with a symbolic batch dimension; loading
and running it needs only JAX, not this package's model code. The ONNX graph (needs the ``onnx`` extra) is
what onnxruntime, TensorRT, OpenVINO and mobile converters take. Only the plain form is exported: a
training-form model or tree, or params of another model, raise ValueError.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from repvgg_jax import equivalence
from repvgg_jax.models import check_variables
from repvgg_jax.reparam import CONV_BRANCH, IDENTITY_BRANCHES, SMALL_BRANCHES


def _assert_plain(params: Mapping, path: str = "") -> None:
  for key, value in params.items():
    if CONV_BRANCH.fullmatch(key) or key in SMALL_BRANCHES + IDENTITY_BRANCHES:
      raise ValueError(f"{path + key!r} is a training-time branch: export the plain model, i.e. "
                       "reparam(params, batch_stats) into create_model(name, deploy=True).")
    if isinstance(value, Mapping):
      _assert_plain(value, f"{path}{key}/")


def check_deploy_params(model, params: Mapping) -> None:
  """Raises ValueError unless ``model`` is a deploy-form network and ``params`` exactly its parameter tree."""
  if not getattr(model, "deploy", False):
    raise ValueError("export takes the deploy-form model: create_model(name, deploy=True).")
  _assert_plain(params)
  try:
    channels = params["stage0"]["rbr_reparam"]["kernel"].shape[2]
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError("params hold no 'stage0/rbr_reparam/kernel': not the params of a deploy model.") from e
  check_variables(model, {"params": params}, channels)


def export_deploy(model, params: Mapping, image_shape: tuple[int, int, int], dtype: Any = jnp.float32,
                  platforms: tuple[str, ...] = ("cpu",)) -> bytes:
  """Serializes ``model.apply({"params": params}, x)`` for x of shape (batch, *image_shape), any batch.

  ``model`` must be a deploy-form network (``create_model(name, deploy=True)``) and ``params`` its plain
  parameters; a training-form tree is refused. ``platforms`` lists where the artifact may run
  (e.g. ("cpu", "cuda", "tpu")).
  """
  check_deploy_params(model, params)
  batch = jax_export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), dtype)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  return jax_export.export(forward, platforms=platforms)(spec).serialize()


def save(path: str, artifact: bytes) -> None:
  with open(path, "wb") as f:
    f.write(artifact)


def load(path: str) -> Callable[[jax.Array], jax.Array]:
  """Loads an exported model: returns f(images (batch, H, W, C)) -> logits (batch, num_classes)."""
  with open(path, "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  return exported.call


# --------------------------------------------------------------------------- ONNX.

ONNX_OPSET = 17  # Every op used (Conv, Relu, Sigmoid, Mul, GlobalAveragePool, Flatten, Gemm, per-axis QDQ) is older.
ONNX_IR_VERSION = 8  # The IR of opset 17; onnxruntime refuses IR versions newer than it knows.


def to_onnx(model, params: Mapping, path: Optional[str] = None, image_size: Optional[tuple[int, int]] = None,
            int8: Optional[Mapping[str, Mapping]] = None):
  """The plain network as an ``onnx.ModelProto``: NCHW float32 input ``images`` (batch, C, height, width),
  all three symbolic, and one output ``logits`` (batch, num_classes), or for a features-only model one output
  ``features_<i>`` (batch, C_i, H / r_i, W / r_i) per selected stage. Written to ``path`` if given.
  ``image_size=(H, W)`` fixes height and width (the batch stays symbolic), as fixed-size exporters do
  (timm's ``torch.onnx.export``); the bench uses it so that onnxruntime gets the same problem from both.

  Per block: Conv (3x3, the fused bias, pads 1, the block's stride and groups), the SE block where the model
  has one (GlobalAveragePool, 1x1 Conv, Relu, 1x1 Conv, Sigmoid, Mul), Relu, RepVGGplus's post SE; then
  GlobalAveragePool, Flatten and Gemm. Kernels are transposed once here (HWIO -> OIHW), so the graph holds no Transpose.
  ``model``/``params`` as for ``export_deploy``; a training-form or mismatched tree raises ValueError.

  ``int8`` (``quantize.int8_layers``: per layer an input scale, int8 weights and per-output-channel weight
  scales) makes the graph INT8 in QDQ form: each quantized layer's input passes QuantizeLinear/DequantizeLinear
  with its static scale and zero point (as uint8, the zero point moved by 128: the same grid), its weight is an
  int8 tensor and its bias an int32 one behind per-channel DequantizeLinear ops, which onnxruntime fuses into
  integer convolutions (the ReLU before a zero point of 0 folds away); ``int8["pool"]``, where given, puts the global pool's input on its grid the same way (so the last
  convolution's output is integer too), and the pool's output goes on the classifier's input grid before Flatten
  and again after it (an integer pool and an integer Gemm in onnxruntime); SE stays float.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top

  check_deploy_params(model, params)
  nodes, weights = [], []

  def constant(name, array, dtype=np.float32):
    weights.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
    return name

  def node(op, inputs, name, **attrs):
    nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    return name

  def quantized(layer):
    return int8 is not None and layer in int8

  def quantized_input(x, layer, name):
    # uint8 with the zero point moved by 128 is the JAX model's int8 grid exactly, and u8 x s8 is the product
    # onnxruntime's integer kernels are built for (VNNI's vpdpbusd); s8 activations cost it a conversion per call.
    scale = constant(f"{name}.input_scale", int8[layer]["input_scale"])
    zero = constant(f"{name}.input_zero_point", int8[layer]["input_zero_point"] + 128, np.uint8)
    return node("DequantizeLinear", [node("QuantizeLinear", [x, scale, zero], f"{name}.input_q"), scale, zero],
                f"{name}.input_dq")

  def weight_and_bias(name, kernel, bias, layer, axis, layout):
    if not quantized(layer):
      return constant(f"{name}.weight", layout(np.asarray(kernel))), constant(f"{name}.bias", bias)
    q, scale = layout(int8[layer]["weight"]), int8[layer]["weight_scale"]
    w = node("DequantizeLinear", [constant(f"{name}.weight_int8", q, np.int8), constant(f"{name}.weight_scale", scale),
                                  constant(f"{name}.weight_zero_point", np.zeros(scale.shape), np.int8)],
             f"{name}.weight", axis=axis)
    # int32 at the input scale times the weight scales, as integer kernels add it (<= half a step off).
    bias_scale = np.float32(int8[layer]["input_scale"]) * scale
    b = node("DequantizeLinear", [constant(f"{name}.bias_int32", np.round(np.asarray(bias) / bias_scale), np.int32),
                                  constant(f"{name}.bias_scale", bias_scale),
                                  constant(f"{name}.bias_zero_point", np.zeros(scale.shape), np.int32)],
             f"{name}.bias", axis=0)
    return w, b

  def conv(x, kernel_hwio, bias, name, strides=1, groups=1, layer=None):
    k = np.shape(kernel_hwio)[0]
    if quantized(layer):
      x = quantized_input(x, layer, name)
    w, b = weight_and_bias(name, kernel_hwio, bias, layer, 0, lambda a: a.transpose(3, 2, 0, 1))
    return node("Conv", [x, w, b], name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[strides, strides],
                group=groups)

  if int8 is not None and model.features_only:
    raise ValueError("INT8 export takes the classifier, not a features-only model.")
  last_of_stage = {spec.stage: spec.name for spec in model.plan()}
  stage_outputs = {}
  x = "images"
  def squeeze_excite(x, se, name):
    s = node("GlobalAveragePool", [x], f"{name}.pool")
    s = node("Relu", [conv(s, np.asarray(se["down"]["kernel"])[None, None], se["down"]["bias"], f"{name}.down")],
             f"{name}.down_relu")
    s = node("Sigmoid", [conv(s, np.asarray(se["up"]["kernel"])[None, None], se["up"]["bias"], f"{name}.up")],
             f"{name}.gate")
    return node("Mul", [x, s], name)

  for spec in model.plan():
    block = params[spec.name]
    fused = block["rbr_reparam"]
    x = conv(x, fused["kernel"], fused["bias"], f"{spec.name}.rbr_reparam", spec.strides, spec.groups, spec.name)
    if spec.use_se:
      x = squeeze_excite(x, block["se"], f"{spec.name}.se")
    x = node("Relu", [x], f"{spec.name}.relu")
    if spec.post_se:
      x = squeeze_excite(x, block["post_se"], f"{spec.name}.post_se")
    if last_of_stage[spec.stage] == spec.name:
      stage_outputs[spec.stage] = x
  if model.features_only:
    outputs = [helper.make_tensor_value_info(node("Identity", [stage_outputs[info["stage"]]], f"features_{i}"),
                                             onnx.TensorProto.FLOAT, ["batch", info["num_chs"], f"height_{i}",
                                                                      f"width_{i}"])
               for i, info in enumerate(model.feature_info())]
  else:
    if quantized("pool"):
      x = quantized_input(x, "pool", "pool")
    x = node("GlobalAveragePool", [x], "pool")
    if quantized("linear"):
      # The classifier's input grid straight after the pool lets onnxruntime pool in integers
      # (QLinearGlobalAveragePool); the same grid again after Flatten, which only moves data, changes no value.
      x = quantized_input(x, "linear", "pool_output")
    x = node("Flatten", [x], "flatten", axis=1)
    if quantized("linear"):
      x = quantized_input(x, "linear", "linear")
    node("Gemm", [x, *weight_and_bias("linear", params["linear"]["kernel"], params["linear"]["bias"], "linear", 1,
                                      lambda a: a)], "logits")
    outputs = [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT,
                                             ["batch", int(params["linear"]["kernel"].shape[-1])])]
  channels = int(params["stage0"]["rbr_reparam"]["kernel"].shape[2])
  graph = helper.make_graph(
      nodes, "repvgg_deploy",
      [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                     ["batch", channels, *(image_size or ("height", "width"))])],
      outputs, weights)
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                            producer_name="repvgg-jax", ir_version=ONNX_IR_VERSION)
  onnx.checker.check_model(proto, full_check=True)
  if path:
    save_onnx(proto, path)
  return proto


LABELS_KEY = "labels"  # metadata_props entry: the class names, a JSON list in label order.


def save_onnx(proto, path: str, labels: Sequence[str] = ()) -> None:
  """Writes ``proto``; ``labels`` (the class names) go in its metadata, so the file names what it predicts."""
  import onnx  # pylint: disable=g-import-not-at-top
  if labels:
    onnx.helper.set_model_props(proto, {LABELS_KEY: json.dumps(list(labels))})
  onnx.save(proto, path)


def onnx_session(proto_or_path, threads: int = 0):
  """An onnxruntime CPU session of an exported model; ``threads`` 0 lets onnxruntime choose.

  Its threads do not spin between runs: a spinning session's idle threads steal the cores of whatever runs next
  (another session, JAX), which made interleaved timings depend on their order (INT8 over float32 at batch 32
  measured 1.25x-1.99x with spinning, 1.61x-1.62x without).
  """
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top

  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  source = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
  return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_onnx(proto_or_path, model, params: Mapping, images, rtol: float = equivalence.RTOL) -> float:
  """Asserts onnxruntime's logits (or feature maps) == the JAX deploy model's (HIGHEST precision) on NHWC
  ``images``; returns the max error relative to each output's largest value, or raises
  ``equivalence.EquivalenceError``."""
  images = np.asarray(images, np.float32)
  expected = equivalence.logits_at_full_precision(model, {"params": params}, images)
  if not model.features_only:
    expected = [expected]
  got = onnx_session(proto_or_path).run(None, {"images": images.transpose(0, 3, 1, 2)})
  if model.features_only:
    got = [g.transpose(0, 2, 3, 1) for g in got]
  error = max(equivalence.max_relative_error(g, np.asarray(e)) for g, e in zip(got, expected, strict=True))
  if error > rtol:
    what = "feature maps" if model.features_only else "logits"
    raise equivalence.EquivalenceError(f"onnxruntime's {what} differ from the JAX deploy model's by {error:.2e} "
                                       f"of the largest value (bound {rtol:.0e}).")
  return error


def save_checked_onnx(model, params: Mapping, images, path: str, labels: Sequence[str] = ()) -> float:
  """Exports the plain network, checks onnxruntime against the JAX deploy logits on ``images`` (``check_onnx``)
  and only then writes ``path`` (``save_onnx``); returns the error. A failed check writes nothing."""
  proto = to_onnx(model, params)
  error = check_onnx(proto, model, params, images)
  save_onnx(proto, path, labels)
  return error
