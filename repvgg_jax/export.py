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
from repvgg_jax.models import check_variables, input_channels
from repvgg_jax.plan import layer_key


def check_deploy_params(model, params: Mapping) -> None:
  """Raises ValueError unless ``model`` is a deploy-form network and ``params`` exactly its parameter tree; the
  params of the model's training form are told apart, with what to do instead."""
  if not getattr(model, "deploy", False):
    raise ValueError("export takes the deploy-form model: create_model(name, deploy=True).")
  channels = input_channels(model, params)
  training = jax.eval_shape(model.clone(deploy=False).init, jax.random.key(0), jnp.zeros((1, 32, 32, channels)))
  if jax.tree.structure(dict(training["params"])) == jax.tree.structure(dict(params)):
    raise ValueError("params hold the model's training-time branches, not its plain form: export the plain model, "
                     "i.e. reparam(params, batch_stats) into create_model(name, deploy=True).")
  check_variables(model, {"params": params}, channels)


def export_deploy(model, params: Mapping, image_shape: tuple[int, int, int], dtype: Any = jnp.float32,
                  platforms: Optional[Sequence[str]] = None) -> bytes:
  """Serializes ``model.apply({"params": params}, x)`` for x of shape (batch, *image_shape), any batch.

  ``model`` must be a deploy-form network (``create_model(name, deploy=True)``) and ``params`` its plain
  parameters; a training-form tree is refused. ``platforms`` lists where the artifact may run, e.g.
  ("cpu", "cuda", "tpu"); None: the platform of JAX's default backend, as ``jax.export``. Each platform gets its
  own lowering, chosen when the artifact is compiled: the CPU its own convolution paths (``backend``), CUDA and TPU
  the plain convolutions and mean, whatever host exports it.
  """
  check_deploy_params(model, params)
  batch = jax_export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch,) + tuple(image_shape), dtype)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  return jax_export.export(forward, platforms=None if platforms is None else tuple(platforms))(spec).serialize()


def save(path: str, artifact: bytes) -> None:
  with open(path, "wb") as f:
    f.write(artifact)


def load(path: str) -> Callable[[jax.Array], jax.Array]:
  """Loads an exported model: returns f(images (batch, H, W, C)) -> logits (batch, num_classes)."""
  with open(path, "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  return exported.call


# --------------------------------------------------------------------------- ONNX.

ONNX_OPSET = 17  # Every op used (Conv, Relu, Erf, Sigmoid, Add, Mul, Div, GlobalAveragePool, Flatten, Gemm, per-axis
# QDQ) is older.
ONNX_IR_VERSION = 8  # The IR of opset 17; onnxruntime refuses IR versions newer than it knows.


POOL = "pool"  # The INT8 name of the global pool's input grid (``quantization.int8_layers``).


class OnnxGraph:
  """The ONNX nodes of a deploy network under construction, for the block kinds' emitters (``plan.BlockKind``).

  Layers are named by their parameter paths ("stage1_0/rbr_reparam"), nodes by the same path with dots. With
  ``int8`` (``quantization.int8_layers``: per INT8 layer, named by the network's ``quantized_modules``, an input
  grid, int8 weights and per-output-channel weight scales), a convolution or the classifier of a listed layer is
  emitted in QDQ form: its input through QuantizeLinear/DequantizeLinear on its static grid (as uint8, the zero
  point moved by 128: the same grid), its weight int8 (zero point 0) and its bias an int32 tensor behind
  per-channel DequantizeLinear ops, which onnxruntime fuses into integer kernels (a ReLU before a
  zero point of 0 folds away); the rest stays float.
  """

  def __init__(self, model, params: Mapping, int8: Optional[Mapping[str, Mapping]] = None):
    from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
    self._helper, self._numpy_helper = helper, numpy_helper
    self.params, self.int8, self._quantized_modules = params, int8, model.quantized_modules
    self.nodes, self.weights = [], []

  def layer(self, path: str) -> Mapping:
    tree = self.params
    for key in path.split("/"):
      tree = tree[key]
    return tree

  def out_channels(self, path: str) -> int:
    return int(np.shape(self.layer(path)["kernel"])[-1])

  def constant(self, name: str, array, dtype=np.float32) -> str:
    self.weights.append(self._numpy_helper.from_array(np.ascontiguousarray(array, dtype), name))
    return name

  def node(self, op: str, inputs, name: str, **attrs) -> str:
    self.nodes.append(self._helper.make_node(op, list(inputs), [name], name=name, **attrs))
    return name

  def _grid(self, path: str) -> Optional[Mapping]:
    """The INT8 grid of the layer at ``path`` (or of ``POOL``); None where it stays float."""
    key = path if path == POOL else layer_key(self._quantized_modules, path)
    return None if self.int8 is None or key is None else self.int8.get(key)

  def quantized_input(self, x: str, path: str, name: str) -> str:
    """``x`` on the input grid of the layer at ``path`` (QuantizeLinear, DequantizeLinear); ``x`` where not INT8."""
    grid = self._grid(path)
    if grid is None:
      return x
    # uint8 with the zero point moved by 128 is the JAX model's int8 grid exactly; s8 activations cost onnxruntime
    # a conversion per call.
    scale = self.constant(f"{name}.input_scale", grid["input_scale"])
    zero = self.constant(f"{name}.input_zero_point", grid["input_zero_point"] + 128, np.uint8)
    return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, scale, zero], f"{name}.input_q"), scale,
                                          zero], f"{name}.input_dq")

  def _weight_and_bias(self, path: str, name: str, layout, axis: int) -> tuple[str, str]:
    params, grid = self.layer(path), self._grid(path)
    if grid is None:
      return (self.constant(f"{name}.weight", layout(np.asarray(params["kernel"]))),
              self.constant(f"{name}.bias", params["bias"]))
    # int8 weights (on the 7-bit grid of quantization.INT8_WEIGHT_BITS, so that CPUs without VNNI, which add pairs of
    # u8 x s8 products in 16 bits, never saturate), zero point 0: onnxruntime's fast u8 x s8 kernels everywhere.
    q, scale = layout(grid["weight"]), grid["weight_scale"]
    w = self.node("DequantizeLinear", [self.constant(f"{name}.weight_int8", q, np.int8),
                                       self.constant(f"{name}.weight_scale", scale),
                                       self.constant(f"{name}.weight_zero_point", np.zeros(scale.shape), np.int8)],
                  f"{name}.weight", axis=axis)
    # int32 at the input scale times the weight scales, as integer kernels add it (<= half a step off).
    bias_scale = np.float32(grid["input_scale"]) * scale
    b = self.node("DequantizeLinear", [
        self.constant(f"{name}.bias_int32", np.round(np.asarray(params["bias"]) / bias_scale), np.int32),
        self.constant(f"{name}.bias_scale", bias_scale),
        self.constant(f"{name}.bias_zero_point", np.zeros(scale.shape), np.int32)], f"{name}.bias", axis=0)
    return w, b

  def conv(self, x: str, path: str, strides: int = 1, groups: int = 1) -> str:
    """Conv with the kernel and bias at ``path`` (HWIO, transposed here to OIHW, so the graph holds no Transpose;
    a 2-D Dense kernel as a 1x1 convolution), padding k // 2."""
    name = path.replace("/", ".")
    k = np.shape(self.layer(path)["kernel"])
    size = k[0] if len(k) == 4 else 1
    oihw = lambda a: a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T[:, :, None, None]
    w, b = self._weight_and_bias(path, name, oihw, 0)
    return self.node("Conv", [self.quantized_input(x, path, name), w, b], name, kernel_shape=[size, size],
                     pads=[size // 2] * 4, strides=[strides, strides], group=groups)

  def relu(self, x: str, name: str) -> str:
    return self.node("Relu", [x], name.replace("/", "."))

  def gelu(self, x: str, name: str) -> str:
    """The exact GELU, x (1 + erf(x / sqrt 2)) / 2 (opset 17 has no Gelu op; onnxruntime fuses this pattern)."""
    name = name.replace("/", ".")
    erf = self.node("Erf", [self.node("Div", [x, self.constant(f"{name}.sqrt2", np.sqrt(2.0))], f"{name}.div")],
                    f"{name}.erf")
    one_plus = self.node("Add", [erf, self.constant(f"{name}.one", 1.0)], f"{name}.add")
    return self.node("Mul", [self.node("Mul", [x, one_plus], f"{name}.mul"), self.constant(f"{name}.half", 0.5)],
                     name)

  def add(self, a: str, b: str, name: str) -> str:
    return self.node("Add", [a, b], name.replace("/", "."))

  def squeeze_excite(self, x: str, path: str, reduce: str, expand: str) -> str:
    """x * sigmoid(expand(relu(reduce(mean_hw(x))))), ``reduce`` and ``expand`` the layers under ``path``."""
    name = path.replace("/", ".")
    s = self.node("GlobalAveragePool", [x], f"{name}.pool")
    s = self.relu(self.conv(s, f"{path}/{reduce}"), f"{path}/{reduce}_relu")
    s = self.node("Sigmoid", [self.conv(s, f"{path}/{expand}")], f"{name}.gate")
    return self.node("Mul", [x, s], name)

  def classifier(self, x: str, path: str) -> str:
    """GlobalAveragePool, Flatten, Gemm ``logits``. INT8: the pool's input on the grid ``POOL`` (so the last
    convolution's output is integer too), and the pool's output on the classifier's input grid before and after
    Flatten (an integer pool and an integer Gemm in onnxruntime; Flatten only moves data)."""
    x = self.node("GlobalAveragePool", [self.quantized_input(x, POOL, "pool")], "pool")
    x = self.quantized_input(x, path, "pool_output")
    x = self.quantized_input(self.node("Flatten", [x], "flatten", axis=1), path, path)
    return self.node("Gemm", [x, *self._weight_and_bias(path, path, lambda a: a, 1)], "logits")


def to_onnx(model, params: Mapping, path: Optional[str] = None, image_size: Optional[tuple[int, int]] = None,
            int8: Optional[Mapping[str, Mapping]] = None):
  """The plain network as an ``onnx.ModelProto``: NCHW float32 input ``images`` (batch, C, height, width),
  all three symbolic, and one output ``logits`` (batch, num_classes), or for a features-only model one output
  ``features_<i>`` (batch, C_i, H / r_i, W / r_i) per selected stage. Written to ``path`` if given.
  ``image_size=(H, W)`` fixes height and width (the batch stays symbolic), as fixed-size exporters do
  (timm's ``torch.onnx.export``); the bench uses it so that onnxruntime gets the same problem from both.

  The nodes are the model's deploy plan, block by block through each block kind's emitter (e.g. RepVGG's Conv with
  the fused kernel and bias, SE, Relu), then the classifier (``OnnxGraph.classifier``). ``model``/``params`` as for
  ``export_deploy``; a training-form or mismatched tree raises ValueError. ``int8`` (``quantization.int8_layers``)
  makes the graph INT8 in QDQ form (``OnnxGraph``).
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top

  check_deploy_params(model, params)
  if int8 is not None and model.features_only:
    raise ValueError("INT8 export takes the classifier, not a features-only model.")
  graph = OnnxGraph(model, params, int8)
  x, stage_outputs = "images", {}
  for layer in model.deploy_plan():
    x = layer.kind.emit(graph, x, layer.name, **layer.attrs)
    if layer.stage is not None:
      stage_outputs[layer.stage] = x
  if model.features_only:
    outputs = [helper.make_tensor_value_info(graph.node("Identity", [stage_outputs[info["stage"]]], f"features_{i}"),
                                             onnx.TensorProto.FLOAT, ["batch", info["num_chs"], f"height_{i}",
                                                                      f"width_{i}"])
               for i, info in enumerate(model.feature_info())]
  else:
    graph.classifier(x, model.head)
    outputs = [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", model.num_classes])]
  onnx_graph = helper.make_graph(
      graph.nodes, "repvgg_deploy",
      [helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT,
                                     ["batch", input_channels(model, params), *(image_size or ("height", "width"))])],
      outputs, graph.weights)
  proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
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
