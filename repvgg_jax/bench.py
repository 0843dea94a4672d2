"""Benchmark: training form vs deploy form (and timm's PyTorch models), printed as a markdown table.

  python -m repvgg_jax.bench --models=RepVGG-A0,RepVGG-B0,RepVGG-B1g4 --batch_sizes=1,32 --engines=jax,torch \
      --plot=benchmarks/throughput.png

Per model, batch size and dtype it measures, in one process: inference latency (median, p90 over repeated
jitted calls after warm-up, each synchronised with ``block_until_ready``) and throughput of the training form
in eval mode and of the deploy form; XLA's compiled peak memory of each; the wall time of ``reparam``
(first call, and jitted steady state); and with ``--train_step`` the images/s of one SGD training step
(with the torch engine also timm's, interleaved).
``--engines`` adds engines to JAX. ``torch`` runs timm's model (training form, and re-parameterized) on the same shapes and the device JAX
uses (CUDA when JAX runs on a GPU: channels_last, cudnn.benchmark, every timed call synchronised; on the CPU
the same number of threads), interleaved round by round with the JAX ones (``time_calls``), and reports the
ratios; bfloat16 rows run timm under ``torch.autocast``. ``--torch_compile`` also times the deploy model
compiled with ``torch.compile``, the strongest PyTorch baseline. ``onnxruntime`` (float32 rows) runs this
project's ONNX export of the deploy form and, with torch installed, timm's re-parameterized model exported by
``torch.onnx.export``: the same engine on both graphs, on the CPU, with as many threads as the others. ``--paper`` is the paper's protocol: batch
128, float32, 224 px. Each row also reports the train/deploy error at HIGHEST precision (measured, not asserted).

``--paper_pairs`` measures instead the paper's Table 4 pairs (RepVGG's deploy form against the ResNet of similar
accuracy with BN folded, both in JAX, each pair interleaved in one run; and timm's pair with the torch engine):

  python -m repvgg_jax.bench --paper_pairs --batch_sizes=8 --dtypes=float32,bfloat16 --engines=jax,torch \
      --memory_batches=1,8,32 --plot=benchmarks/pairs.png

``--memory_batches`` prints XLA's peak activation memory of each model's forms across batch sizes (Figure 3).
"""

import functools
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import repvgg_jax as rv
from repvgg_jax import cli, export, families, resnet, steps
from repvgg_jax.equivalence import logits_at_full_precision, max_relative_error

flags.DEFINE_list("models", ["RepVGG-A0"], "Official variant names, and the baselines ResNet-18/34/50/101/152.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes.")
flags.DEFINE_integer("image_size", 224, "Input resolution.")
flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes: float32, bfloat16.")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (after warm-up).")
flags.DEFINE_list("engines", ["jax"], "Engines, interleaved: jax (always), torch (timm), onnxruntime.")
flags.DEFINE_bool("torch_compile", False, "With the torch engine: also time timm's deploy model compiled.")
flags.DEFINE_bool("paper", False, "The paper's protocol: batch 128, float32, 224 px (overrides those flags).")
flags.DEFINE_bool("train_step", False, "Also time one SGD training step of the training form.")
flags.DEFINE_string("plot", "", "Write a PNG: the paper's ImageNet top-1 against measured deploy throughput.")
flags.DEFINE_bool("paper_pairs", False, "The paper's Table 4 pairs (RepVGG against the ResNet of similar accuracy) "
                  "side by side: throughput, batch-1 latency, memory, ratios with the paper's; all pairs' models "
                  "unless --models is given (then the pairs among them); batch 1 is added to --batch_sizes.")
flags.DEFINE_list("memory_batches", [], "Also print XLA's peak activation memory of each model's forms at these "
                  "batch sizes (the paper's Figure 3), compiled only.")
FLAGS = flags.FLAGS

# The baselines' ImageNet top-1 (%) as the RepVGG paper reports them (Table 4); the families' own are in the registry.
RESNET_TOP1 = {"ResNet-18": 71.16, "ResNet-34": 74.17, "ResNet-50": 76.31, "ResNet-101": 77.21, "ResNet-152": 77.78}


def timm_name(name: str) -> Optional[str]:
  """timm's model name of a variant or a ResNet baseline; None where timm has none."""
  return resnet.RESNETS[name][2] if name in resnet.RESNETS else families.timm_name(name)


def top1(name: str) -> Optional[float]:
  """The published ImageNet top-1 (%) of a variant or a baseline; None where unknown."""
  return RESNET_TOP1[name] if name in resnet.RESNETS else families.top1(name)


# The paper's Table 4: (RepVGG, the ResNet of similar accuracy), and its speed (examples/s, 1080Ti, batch 128, fp32,
# PyTorch). The four pairs the abstract and the project's issue quote are A0/R18, A1/R34, A2/R50, B1g4/R101;
# the other speeds are Table 4's rows as transcribed here.
PAPER_PAIRS = (("RepVGG-A0", "ResNet-18"), ("RepVGG-A1", "ResNet-34"), ("RepVGG-B0", "ResNet-34"),
               ("RepVGG-A2", "ResNet-50"), ("RepVGG-B1g4", "ResNet-101"), ("RepVGG-B1g2", "ResNet-101"),
               ("RepVGG-B1", "ResNet-101"), ("RepVGG-B2g4", "ResNet-152"), ("RepVGG-B2", "ResNet-152"))
PAPER_SPEED = {"ResNet-18": 2442, "RepVGG-A0": 3256, "ResNet-34": 1419, "RepVGG-A1": 2339, "RepVGG-B0": 1817,
               "ResNet-50": 719, "RepVGG-A2": 1322, "RepVGG-B1g4": 868, "RepVGG-B1g2": 792, "ResNet-101": 430,
               "RepVGG-B1": 685, "ResNet-152": 297, "RepVGG-B2g4": 581, "RepVGG-B2": 460}


def time_calls(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each zero-argument function, interleaved round by round after one warm-up call each.

  With several functions, each first runs once untimed in every round: a call straight after another
  program's pays for caches and thread pools that program left cold or busy (up to 25% of a JAX training
  step right after a PyTorch one), which no single-framework program pays.
  """
  for fn in fns.values():
    fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      if len(fns) > 1:
        fn()
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def peak_memory_mb(jitted, *args, activations_only: bool = False) -> float:
  """XLA's compiled memory: arguments (weights, images) + outputs + temporaries (activations), in MB; with
  ``activations_only``, the temporaries alone."""
  return _memory_mb(jitted.lower(*args).compile(), activations_only)


def _memory_mb(compiled, activations_only: bool = False) -> float:
  """``peak_memory_mb`` of an already compiled executable."""
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  temp = stats.temp_size_in_bytes
  return (temp if activations_only else stats.argument_size_in_bytes + stats.output_size_in_bytes + temp) / 2**20


def forms(name: str, dtype) -> tuple:
  """(training form, deploy form, fusion of training variables into deploy params) of a RepVGG-family variant,
  or of a ResNet baseline (conv + BN, BN folded)."""
  if name in resnet.RESNETS:
    return (resnet.create_resnet(name, dtype=dtype), resnet.create_resnet(name, deploy=True, dtype=dtype),
            resnet.fold_batch_norms)
  return (rv.create_model(name, dtype=dtype), rv.create_model(name, deploy=True, dtype=dtype),
          lambda variables: rv.reparam(variables["params"], variables["batch_stats"]))


def _summary(seconds: list[float], batch: int) -> dict:
  median = statistics.median(seconds)
  return {"median_ms": 1e3 * median, "p90_ms": 1e3 * float(np.percentile(seconds, 90)), "img_s": batch / median}


def torch_device() -> str:
  """The device timm runs on: the GPU when JAX runs on one, else the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _torch_setup(name: str, batch: int, size: int, dtype_name: str):
  """(torch, timm, device, a zero-argument-call wrapper that autocasts and synchronises, input images)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise app.UsageError(f"the torch engine needs torch and timm installed ({e}).") from e
  device = torch_device()
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
  else:
    torch.set_num_threads(os.cpu_count() or 1)
  layout = torch.channels_last if device == "cuda" else torch.contiguous_format
  x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)

  def timed(fn):
    def run():
      with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16"):
        out = fn()
      if device == "cuda":
        torch.cuda.synchronize()
      return out
    return run

  def create(train: bool):
    torch.manual_seed(0)
    model = timm.create_model(timm_name(name), pretrained=False)
    return model.to(device, memory_format=layout).train(train)

  return torch, device, timed, create, x


def _torch_calls(name: str, batch: int, size: int, dtype_name: str, compile_deploy: bool) -> dict:
  """timm's training form (eval mode) and re-parameterized form, optionally compiled, as timed calls."""
  if timm_name(name) is None:
    return {}
  from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top
  torch, _, timed, create, x = _torch_setup(name, batch, size, dtype_name)
  train, deploy = create(False), reparameterize_model(create(False))

  def infer(model):
    with torch.inference_mode():
      return model(x)

  calls = {"torch train": timed(functools.partial(infer, train)), "torch deploy": timed(functools.partial(infer, deploy))}
  if compile_deploy:
    calls["torch compiled deploy"] = timed(functools.partial(infer, torch.compile(deploy)))
  return calls


def _onnx_calls(name: str, deploy, plain, x, with_timm: bool) -> dict:
  """onnxruntime on this project's ONNX export of the deploy form, and on timm's exported deploy model."""
  threads = os.cpu_count() or 1
  images = {"images": np.asarray(x).transpose(0, 3, 1, 2)}
  calls = {}
  if with_timm and timm_name(name):
    import torch  # pylint: disable=g-import-not-at-top
    from timm.utils.model import reparameterize_model  # pylint: disable=g-import-not-at-top
    _, _, _, create, _ = _torch_setup(name, 1, x.shape[1], "float32")
    model = reparameterize_model(create(False)).cpu()
    # Our graph from timm's fused weights: the same engine, the same numbers, only the graphs differ.
    plain = rv.load_pytorch_state_dict(model.state_dict(), name, deploy=True)["params"]
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "timm.onnx")
      torch.onnx.export(model, torch.from_numpy(images["images"][:1]), path, input_names=["images"],
                        output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, dynamo=False,
                        opset_version=export.ONNX_OPSET)
      theirs = export.onnx_session(path, threads)
    calls["ort timm deploy"] = lambda: theirs.run(["logits"], images)
  # Height and width fixed as in timm's exported graph, so the engine gets the same problem from both.
  ours = export.onnx_session(export.to_onnx(deploy, plain, image_size=x.shape[1:3]), threads)
  return {"ort deploy": lambda: ours.run(["logits"], images), **calls}


def forms_error(model, variables, deploy, plain, images) -> float:
  """Train form (eval) vs deploy form in float32 at HIGHEST precision, relative to the largest logit.

  Reported, not asserted (the tests assert): a deep network at its random initialisation can be so badly
  conditioned that float32 alone differs by ~1e-3 (MobileOne-S4, logits ~2000), which says nothing of the
  fusion.
  """
  y_train = logits_at_full_precision(model.clone(dtype=jnp.float32), variables, images, train=False)
  y_deploy = logits_at_full_precision(deploy.clone(dtype=jnp.float32), {"params": plain}, images)
  return max_relative_error(y_deploy, y_train)


def bench_one(name: str, batch: int, size: int, dtype_name: str, repeats: int, engines=("jax",),
              train_step: bool = False, torch_compile: bool = False) -> dict:
  """All measurements of one (model, batch, dtype)."""
  model, deploy, fuse = forms(name, jnp.dtype(dtype_name))
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:1])

  start = time.perf_counter()
  plain = jax.block_until_ready(fuse(variables))
  reparam_first_s = time.perf_counter() - start
  jit_fuse = jax.jit(fuse)
  reparam_jit = time_calls({"r": lambda: jax.block_until_ready(jit_fuse(variables))}, 3)["r"]

  train_fn = jax.jit(functools.partial(model.apply, train=False))
  deploy_fn = jax.jit(deploy.apply)
  deploy_vars = {"params": plain}
  calls = {"jax train": lambda: jax.block_until_ready(train_fn(variables, x)),
           "jax deploy": lambda: jax.block_until_ready(deploy_fn(deploy_vars, x))}
  if "torch" in engines:
    calls.update(_torch_calls(name, batch, size, dtype_name, torch_compile))
  if "onnxruntime" in engines and dtype_name == "float32" and name not in resnet.RESNETS:
    calls.update(_onnx_calls(name, deploy, plain, x, with_timm="torch" in engines))
  times = time_calls(calls, repeats)
  row = {"model": name, "batch": batch, "dtype": dtype_name,
         "reparam_first_ms": 1e3 * reparam_first_s, "reparam_jit_ms": 1e3 * statistics.median(reparam_jit),
         "train_mem_mb": peak_memory_mb(train_fn, variables, x),
         "deploy_mem_mb": peak_memory_mb(deploy_fn, deploy_vars, x),
         "equivalence": forms_error(model, variables, deploy, plain, x[:8])}
  for key, seconds in times.items():
    row[key] = _summary(seconds, batch)
  if train_step and name not in resnet.RESNETS:
    steps = {"jax step": _train_step_call(model, variables, x)}
    if "torch" in engines and timm_name(name):
      steps["torch step"] = _torch_train_step_call(name, batch, size, dtype_name)
    for key, seconds in time_calls(steps, max(2, repeats // 3)).items():
      row[key] = _summary(seconds, batch)
  return row


def _torch_train_step_call(name: str, batch: int, size: int, dtype_name: str) -> Callable[[], object]:
  """One SGD step (momentum 0.9, cross-entropy) of timm's training-form model, BN in training mode."""
  torch, device, timed, create, x = _torch_setup(name, batch, size, dtype_name)
  model = create(True)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  labels = torch.zeros(batch, dtype=torch.long, device=device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    optimizer.step()

  return timed(step)


def _train_step_call(model, variables, x) -> Callable[[], object]:
  """One SGD step of the project's pmapped training step (on one device), as a zero-argument function."""
  tx = optax.sgd(0.01, momentum=0.9)
  state = steps.TrainState.create(apply_fn=model.clone(bn_axis_name=steps.AXIS).apply,
                                  params=variables["params"], tx=tx, batch_stats=variables["batch_stats"],
                                  rng=jax.random.key_data(jax.random.key(0)))
  step = jax.pmap(functools.partial(steps.train_step, learning_rate=optax.constant_schedule(0.01),
                                    num_classes=1000), axis_name=steps.AXIS, devices=jax.devices()[:1])
  state = steps.replicate(state, jax.devices()[:1])
  batch = {"image": x[None], "label": jnp.zeros((1, x.shape[0]), jnp.int32)}
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics)

  return run


def format_table(rows: list[dict]) -> str:
  """A markdown table of ``bench_one`` rows."""
  has_torch = any("torch deploy" in r for r in rows)
  has_step = any("jax step" in r for r in rows)
  has_torch_step = any("torch step" in r for r in rows)
  has_compiled = any("torch compiled deploy" in r for r in rows)
  has_ort = any("ort deploy" in r for r in rows)
  has_ort_timm = any("ort timm deploy" in r for r in rows)
  head = ["model", "batch", "dtype", "train img/s", "deploy img/s", "deploy/train", "deploy median ms",
          "deploy p90 ms", "mem train/deploy MB", "reparam ms (first, jit)", "max rel err (HIGHEST)"]
  if has_torch:
    head += ["timm train img/s", "timm deploy img/s", "deploy ours/timm"]
  if has_compiled:
    head += ["timm compiled deploy img/s", "deploy ours/compiled"]
  if has_ort:
    head += ["ort (our onnx) img/s"]
  if has_ort_timm:
    head += ["ort (timm onnx) img/s", "ort ours/timm"]
  if has_step:
    head += ["train step img/s"]
  if has_torch_step:
    head += ["timm train step img/s", "step ours/timm"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    t, d = r["jax train"], r["jax deploy"]
    cells = [r["model"], str(r["batch"]), r["dtype"], f"{t['img_s']:.1f}", f"{d['img_s']:.1f}",
             f"{d['img_s'] / t['img_s']:.2f}x", f"{d['median_ms']:.1f}", f"{d['p90_ms']:.1f}",
             f"{r['train_mem_mb']:.0f} / {r['deploy_mem_mb']:.0f} ({r['train_mem_mb'] / r['deploy_mem_mb']:.2f}x)",
             f"{r['reparam_first_ms']:.0f}, {r['reparam_jit_ms']:.1f}", f"{r['equivalence']:.1e}"]
    if has_torch:
      if "torch deploy" in r:
        td, tt = r["torch deploy"], r["torch train"]
        cells += [f"{tt['img_s']:.1f}", f"{td['img_s']:.1f}", f"{d['img_s'] / td['img_s']:.2f}x"]
      else:
        cells += ["-", "-", "-"]
    if has_compiled:
      tc = r.get("torch compiled deploy")
      cells += [f"{tc['img_s']:.1f}", f"{d['img_s'] / tc['img_s']:.2f}x"] if tc else ["-", "-"]
    if has_ort:
      cells += [f"{r['ort deploy']['img_s']:.1f}" if "ort deploy" in r else "-"]
    if has_ort_timm:
      ot = r.get("ort timm deploy")
      cells += [f"{ot['img_s']:.1f}", f"{r['ort deploy']['img_s'] / ot['img_s']:.2f}x"] if ot else ["-", "-"]
    if has_step:
      cells += [f"{r['jax step']['img_s']:.1f}" if "jax step" in r else "-"]
    if has_torch_step:
      cells += ([f"{r['torch step']['img_s']:.1f}", f"{r['jax step']['img_s'] / r['torch step']['img_s']:.2f}x"]
                if "torch step" in r else ["-", "-"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _inference_call(name: str, batch: int, size: int, dtype_name: str) -> tuple[Callable[[], object], float, float]:
  """(a zero-argument timed call of the model's inference form in JAX: RepVGG's deploy form, a ResNet with BN
  folded; XLA's compiled memory of it in MB; XLA's count of its floating-point operations per image in GFLOP, a
  multiply-add counting 2, which with images/s gives the arithmetic rate the model reaches)."""
  model, deploy, fuse = forms(name, jnp.dtype(dtype_name))
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:1])
  params = {"params": jax.jit(fuse)(variables)}
  compiled = jax.jit(deploy.apply).lower(params, x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (lambda: jax.block_until_ready(compiled(params, x))), _memory_mb(compiled), float(cost["flops"]) / batch / 1e9


def bench_pair(ours: str, theirs: str, batch: int, size: int, dtype_name: str, repeats: int, engines) -> dict:
  """One of the paper's pairs at one batch and dtype: the two inference forms timed interleaved in one run (and
  timm's two, eager, where the torch engine is on: its RepVGG re-parameterized, its ResNet as the paper ran it,
  BN unfused), with XLA's compiled memory and FLOP count of each."""
  calls, memory, gflop = {}, {}, {}
  for role, name in (("RepVGG", ours), ("ResNet", theirs)):
    calls[role], memory[role], gflop[role] = _inference_call(name, batch, size, dtype_name)
    if "torch" in engines and timm_name(name):  # timm has no B1g2 (nor B2g2, B3g2).
      calls[f"timm {role}"] = _torch_calls(name, batch, size, dtype_name, False)["torch deploy"]
  times = time_calls(calls, repeats)
  return {"pair": (ours, theirs), "batch": batch, "dtype": dtype_name, "memory_mb": memory, "gflop": gflop,
          **{role: _summary(seconds, batch) for role, seconds in times.items()}}


def format_pairs(rows: list[dict]) -> str:
  """The paper's pairs side by side (``bench_pair`` rows), per dtype and batch above 1: images/s of each in JAX,
  the ratio, the paper's ratio (1080Ti, batch 128, fp32), timm's ratio where measured, batch-1 latency, memory."""
  index = {(r["pair"], r["batch"], r["dtype"]): r for r in rows}
  has_torch = any("timm RepVGG" in r for r in rows)
  head = ["RepVGG", "ResNet", "dtype", "batch", "RepVGG img/s", "ResNet img/s", "ratio", "paper ratio"]
  head += ["timm RepVGG / ResNet img/s", "timm ratio"] if has_torch else []
  head += ["batch-1 ms RepVGG / ResNet", "memory MB RepVGG / ResNet", "GFLOP/image RepVGG / ResNet",
           "GFLOP/s reached RepVGG / ResNet"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for dtype in sorted({r["dtype"] for r in rows}, reverse=True):
    for batch in sorted({r["batch"] for r in rows if r["batch"] > 1} or {1}):
      for pair in PAPER_PAIRS:
        r, r1 = index.get((pair, batch, dtype)), index.get((pair, 1, dtype))
        if r is None:
          continue
        fast, slow = r["RepVGG"]["img_s"], r["ResNet"]["img_s"]
        cells = [*pair, dtype, str(batch), f"{fast:.1f}", f"{slow:.1f}", f"{fast / slow:.2f}x",
                 f"{PAPER_SPEED[pair[0]] / PAPER_SPEED[pair[1]]:.2f}x"]
        if has_torch and "timm RepVGG" in r:
          a, b = r["timm RepVGG"]["img_s"], r["timm ResNet"]["img_s"]
          cells += [f"{a:.1f} / {b:.1f}", f"{a / b:.2f}x"]
        elif has_torch:
          cells += ["-", "-"]
        cells += [f"{r1['RepVGG']['median_ms']:.1f} / {r1['ResNet']['median_ms']:.1f}" if r1 else "-",
                  f"{r['memory_mb']['RepVGG']:.0f} / {r['memory_mb']['ResNet']:.0f}",
                  f"{r['gflop']['RepVGG']:.2f} / {r['gflop']['ResNet']:.2f}",
                  f"{r['gflop']['RepVGG'] * fast:.0f} / {r['gflop']['ResNet'] * slow:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def largest_map_mb(model, variables, x) -> float:
  """The largest output of any layer of ``model`` on images ``x`` (shapes only, float32), in MB."""
  def apply(variables, x):
    return model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
  _, state = jax.eval_shape(apply, variables, x)
  return max(leaf.size for leaf in jax.tree.leaves(state["intermediates"])) * 4 / 2**20


def activation_memory(names, batches, size: int) -> str:
  """XLA's peak temporary memory (compiled only, float32) of each model's training form (in eval mode) and deploy
  form (a ResNet's: BN folded, the shortcuts kept) across batch sizes: the paper's Figure 3, measured. The
  temporaries can also hold batch-independent buffers (kernels re-laid out for small-map convolutions), so the
  activations are read off the growth per image between consecutive batch sizes, and given in units of the
  largest feature map for the paper's arithmetic: a plain layer needs its input and its output alive, a
  multi-branch block each branch's output until the sum, a residual block its input until the addition."""
  head = ["model", "batch", "temp MB training / deploy", "per image MB training / deploy", "training / deploy",
          "largest map per image MB", "maps per image: training / deploy"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in names:
    model, deploy, fuse = forms(name, jnp.float32)
    previous = None
    for batch in sorted(batches):
      x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
      variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
      plain = {"params": jax.eval_shape(fuse, variables)}
      temp = (peak_memory_mb(jax.jit(functools.partial(model.apply, train=False)), variables, x, activations_only=True),
              peak_memory_mb(jax.jit(deploy.apply), plain, x, activations_only=True))
      map_mb = largest_map_mb(deploy, plain, x) / batch
      cells = [name, str(batch), f"{temp[0]:.1f} / {temp[1]:.1f}"]
      if previous is None:
        cells += ["-", "-", f"{map_mb:.2f}", "-"]
      else:
        per_image = [(t - p) / (batch - previous[0]) for t, p in zip(temp, previous[1])]
        cells += [f"{per_image[0]:.2f} / {per_image[1]:.2f}", f"{per_image[0] / per_image[1]:.2f}x", f"{map_mb:.2f}",
                  f"{per_image[0] / map_mb:.1f} / {per_image[1] / map_mb:.1f}"]
      previous = (batch, temp)
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(points: dict[str, dict[str, float]], batch: int, path: str) -> None:
  """The paper's ImageNet top-1 against measured images/s, like its Figure 1: ``points`` maps a series' label
  to {model: images/s}."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for (label, speeds), marker in zip(points.items(), "os^"):
    names = [m for m in speeds if top1(m) is not None]
    ax.scatter([speeds[m] for m in names], [top1(m) for m in names], marker=marker, label=label)
    for m in names:
      ax.annotate(m.replace("RepVGG-", "").replace("ResNet-", "R"), (speeds[m], top1(m)), fontsize=8,
                  xytext=(4, 2), textcoords="offset points")
  ax.set_xlabel(f"measured images/s ({jax.devices()[0].platform}, batch {batch}, float32)")
  ax.set_ylabel("ImageNet top-1 (%, paper)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_rows(rows: list[dict], path: str) -> None:
  """``plot`` of ``bench_one`` rows (largest batch, float32): training and deploy forms."""
  batch = max(r["batch"] for r in rows)
  best = [r for r in rows if r["dtype"] == "float32" and r["batch"] == batch]
  plot({label: {r["model"]: r[form]["img_s"] for r in best} for label, form in
        (("training form", "jax train"), ("deploy form", "jax deploy"))}, batch, path)


def plot_pairs(rows: list[dict], path: str) -> None:
  """``plot`` of ``bench_pair`` rows (largest batch, float32): RepVGG's deploy form and the ResNets (a ResNet in
  several pairs at its fastest)."""
  batch = max(r["batch"] for r in rows)
  points = {"RepVGG deploy form": {}, "ResNet (BN folded)": {}}
  for r in rows:
    if r["dtype"] == "float32" and r["batch"] == batch:
      for (label, speeds), name, role in zip(points.items(), r["pair"], ("RepVGG", "ResNet")):
        speeds[name] = max(speeds.get(name, 0.0), r[role]["img_s"])
  plot(points, batch, path)


def cpu_description() -> str:
  """The host CPU's model, core count and the vector extensions that decide CPU speed (AVX2, AVX-512, VNNI, AMX),
  from /proc/cpuinfo where there is one: every CPU figure is printed beside it."""
  model, cpu_flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          cpu_flags = set(value.split())
  except OSError:
    pass
  wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
  present = " ".join(f for f in wanted if f in cpu_flags) or "none of avx2/avx512/vnni/amx"
  return f"{model}, {os.cpu_count()} CPUs, flags: {present}"


def header(engines) -> str:
  """The machine, the devices and the versions the numbers were measured with."""
  text = (f"JAX on {jax.devices()[0].device_kind} ({jax.default_backend()}), host {cpu_description()}, "
          f"jax {jax.__version__}, {FLAGS.image_size} px, {FLAGS.repeats} timed calls, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if "onnxruntime" in engines:
    import onnxruntime  # pylint: disable=g-import-not-at-top
    text += f"; onnxruntime {onnxruntime.__version__} on cpu ({os.cpu_count()} threads)"
  if "torch" in engines:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    device = torch_device()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    text += f"; timm {timm.__version__} / torch {torch.__version__} on {device} ({name})"
  return text


def main(argv):
  del argv
  if FLAGS.paper:
    FLAGS.batch_sizes, FLAGS.dtypes, FLAGS.image_size = ["128"], ["float32"], 224
  unknown = sorted(set(FLAGS.engines) - {"jax", "torch", "onnxruntime"})
  if unknown:
    raise app.UsageError(f"unknown engine(s) {unknown}; choose from jax, torch, onnxruntime.")
  if FLAGS.torch_compile and "torch" not in FLAGS.engines:
    raise app.UsageError("--torch_compile needs --engines=...,torch.")
  if FLAGS.paper_pairs:
    if not FLAGS["models"].present:
      FLAGS.models = list(dict.fromkeys(name for pair in PAPER_PAIRS for name in pair))
    FLAGS.batch_sizes = list(dict.fromkeys(["1"] + FLAGS.batch_sizes))
  for name in FLAGS.models:
    try:
      if name not in resnet.RESNETS:
        families.family_of(name)
    except ValueError as e:
      raise cli.UserError(f"--models: {e} (or a baseline: {', '.join(resnet.RESNETS)})") from e
  if not all(b.isdigit() and int(b) > 0 for b in FLAGS.memory_batches):
    raise cli.UserError(f"--memory_batches must be positive integers; got {','.join(FLAGS.memory_batches)}.")
  if not all(b.isdigit() and int(b) > 0 for b in FLAGS.batch_sizes):
    raise cli.UserError(f"--batch_sizes must be positive integers; got {','.join(FLAGS.batch_sizes)}.")
  if not set(FLAGS.dtypes) <= {"float32", "bfloat16"}:
    raise cli.UserError(f"--dtypes: float32 and/or bfloat16; got {','.join(FLAGS.dtypes)}.")
  batches = [int(b) for b in FLAGS.batch_sizes]
  if FLAGS.paper_pairs:
    pairs = [pair for pair in PAPER_PAIRS if set(pair) <= set(FLAGS.models)]
    if not pairs:
      raise cli.UserError(f"--paper_pairs: no pair of Table 4 among --models ({', '.join(FLAGS.models)}); pairs: "
                          + ", ".join("/".join(pair) for pair in PAPER_PAIRS))
    rows = []
    for pair in pairs:
      for batch in batches:
        for dtype_name in FLAGS.dtypes:
          rows.append(bench_pair(*pair, batch, FLAGS.image_size, dtype_name, FLAGS.repeats, FLAGS.engines))
          print(f"done: {'/'.join(pair)} batch {batch} {dtype_name}: "
                f"{rows[-1]['RepVGG']['img_s']:.1f} / {rows[-1]['ResNet']['img_s']:.1f} img/s", flush=True)
    print(f"\n{header(FLAGS.engines)}\n\nThe paper's pairs (ResNets with BN folded into their convolutions):\n\n"
          f"{format_pairs(rows)}")
    if FLAGS.plot:
      plot_pairs(rows, FLAGS.plot)
  else:
    rows = []
    for name in FLAGS.models:
      for batch in batches:
        for dtype_name in FLAGS.dtypes:
          rows.append(bench_one(name, batch, FLAGS.image_size, dtype_name, FLAGS.repeats, FLAGS.engines,
                                FLAGS.train_step, FLAGS.torch_compile))
          print(f"done: {name} batch {batch} {dtype_name}", flush=True)
    print(f"\n{header(FLAGS.engines)}\n")
    print(format_table(rows))
    if FLAGS.plot:
      plot_rows(rows, FLAGS.plot)
  if FLAGS.memory_batches:
    print(f"\nPeak activation memory (XLA, float32, {FLAGS.image_size} px):\n\n"
          f"{activation_memory(FLAGS.models, [int(b) for b in FLAGS.memory_batches], FLAGS.image_size)}")
  if FLAGS.plot:
    print(f"\nplot written to {FLAGS.plot}")

if __name__ == "__main__":
  cli.run(main)
