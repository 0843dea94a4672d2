"""RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021; DingXiaoH/RepVGG, timm).

A variant is fixed by four numbers per stage and two flags (the paper's Table 2 and the official repository):
  * ``num_blocks``: blocks in stage1..stage4 (stage0 is always one block);
  * ``width_multiplier``: (a, a, a, b); stage widths are 64a, 128a, 256a, 512b and stage0 is min(64, 64a);
  * ``groups``: the gN variants use N-group convolutions in layers 2, 4, ..., 26, counting blocks from 1 at
    stage1's first block (stage0 is never grouped);
  * ``use_se``: D2se puts squeeze-and-excitation on the sum of the branches, before the ReLU.

The training-time block is ReLU(SE(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))), the identity branch only where the
shapes allow; it fuses into one 3x3 convolution with a bias (``reparam.fuse_branches``), so the deploy form is a
plain stack (``models.PlainBlock``). Parameter names are the official PyTorch ones (``rbr_dense``, ``rbr_1x1``,
``rbr_identity``, ``se.down``/``se.up``, ``linear``), so that weights map one to one; timm renames them.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from repvgg_jax import models, plan, reparam, torch_weights
from repvgg_jax.models import BlockSpec, batch_norm

A_DEPTHS = (2, 4, 14, 1)
B_DEPTHS = (4, 6, 16, 1)
D_DEPTHS = (8, 14, 24, 1)

# The official rule: every other layer, from the 2nd to the 26th, is grouped in a gN variant.
GROUPWISE_LAYERS = tuple(range(2, 27, 2))


@dataclasses.dataclass(frozen=True)
class Variant:
  num_blocks: tuple[int, int, int, int]
  width_multiplier: tuple[float, float, float, float]
  groups: int = 1
  use_se: bool = False


def _ab(a: float, b: float) -> tuple[float, float, float, float]:
  return (a, a, a, b)


VARIANTS: dict[str, Variant] = {
    "RepVGG-A0": Variant(A_DEPTHS, _ab(0.75, 2.5)),
    "RepVGG-A1": Variant(A_DEPTHS, _ab(1, 2.5)),
    "RepVGG-A2": Variant(A_DEPTHS, _ab(1.5, 2.75)),
    "RepVGG-B0": Variant(B_DEPTHS, _ab(1, 2.5)),
    "RepVGG-B1": Variant(B_DEPTHS, _ab(2, 4)),
    "RepVGG-B1g2": Variant(B_DEPTHS, _ab(2, 4), groups=2),
    "RepVGG-B1g4": Variant(B_DEPTHS, _ab(2, 4), groups=4),
    "RepVGG-B2": Variant(B_DEPTHS, _ab(2.5, 5)),
    "RepVGG-B2g2": Variant(B_DEPTHS, _ab(2.5, 5), groups=2),
    "RepVGG-B2g4": Variant(B_DEPTHS, _ab(2.5, 5), groups=4),
    "RepVGG-B3": Variant(B_DEPTHS, _ab(3, 5)),
    "RepVGG-B3g2": Variant(B_DEPTHS, _ab(3, 5), groups=2),
    "RepVGG-B3g4": Variant(B_DEPTHS, _ab(3, 5), groups=4),
    "RepVGG-D2se": Variant(D_DEPTHS, _ab(2.5, 5), use_se=True),
}
# timm's names (timm has no B1g2, B2g2, B3g2) and ImageNet top-1 (%) from the paper (Tables 4, 5) and the README.
TIMM_NAMES = {name: name.replace("RepVGG-", "repvgg_").lower() for name in VARIANTS if not name.endswith("g2")}
TOP1 = {"RepVGG-A0": 72.41, "RepVGG-A1": 74.46, "RepVGG-A2": 76.48, "RepVGG-B0": 75.14, "RepVGG-B1": 78.37,
        "RepVGG-B1g2": 77.78, "RepVGG-B1g4": 77.58, "RepVGG-B2": 78.78, "RepVGG-B2g4": 79.38, "RepVGG-B3": 80.52,
        "RepVGG-B3g4": 80.21}
PARAMS_M = {"RepVGG-A0": "8.31", "RepVGG-A1": "12.79", "RepVGG-A2": "25.50", "RepVGG-B0": "14.34", "RepVGG-B1": "51.83",
            "RepVGG-B1g2": "41.36", "RepVGG-B1g4": "36.13", "RepVGG-B2": "80.32", "RepVGG-B2g4": "55.78",
            "RepVGG-B3": "110.96", "RepVGG-B3g4": "75.63"}  # Deployed, the paper's Table 4.


def block_plan(num_blocks, width_multiplier, groups: int = 1, use_se: bool = False) -> list[BlockSpec]:
  """The blocks of a network, stage0 first, exactly as the official ``RepVGG._make_stage`` lays them out.

  Block names are ``stage0`` and ``stage{s}_{i}`` (the official PyTorch ``stage{s}.{i}``). Every stage
  starts with a stride-2 block.
  """
  a = width_multiplier
  widths = (int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(512 * a[3]))
  grouped = set(GROUPWISE_LAYERS) if groups > 1 else set()
  blocks = [BlockSpec("stage0", min(64, int(64 * a[0])), 2, 1, use_se=use_se)]
  layer = 1
  for stage, (depth, width) in enumerate(zip(num_blocks, widths), start=1):
    for i in range(depth):
      spec = BlockSpec(f"stage{stage}_{i}", width, 2 if i == 0 else 1, groups if layer in grouped else 1,
                       use_se=use_se)
      in_channels = blocks[-1].features
      if in_channels % spec.groups or spec.features % spec.groups:
        raise ValueError(f"{spec.name}: {spec.groups} groups do not divide its {in_channels} input and "
                         f"{spec.features} output channels; choose width_multiplier or groups to match.")
      blocks.append(spec)
      layer += 1
  return blocks


class RepVGGBlock(nn.Module):
  """The training-time block: ReLU(SE(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))).

  The identity branch exists only where input and output channels match and the stride is 1; the 1x1
  branch has padding 0 and the 3x3 branch's stride and groups. (N, H, W, Cin) -> (N, H/s, W/s, features).
  """

  features: int
  strides: int = 1
  groups: int = 1
  use_se: bool = False
  norm: Callable[..., nn.Module] = batch_norm()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    return models.branches_se_relu(self, x, train, ["rbr_dense"], 3, "rbr_1x1", "rbr_identity")


_BLOCK_ENTRIES = r"rbr_dense|rbr_1x1|rbr_identity|se"


def fuse_block(params: Mapping, stats: Optional[Mapping], eps: float, path: tuple[str, ...]) -> dict:
  """A RepVGG block {rbr_dense: {conv, bn}, rbr_1x1: {conv, bn}, rbr_identity (a BN, optional), se (optional)}
  -> {rbr_reparam: {kernel (3,3,I,O), bias (O,)}} plus ``se`` unchanged."""
  stats = stats or {}
  reparam.check_entries(params, stats, _BLOCK_ENTRIES, path, "rbr_dense, rbr_1x1, rbr_identity and se")
  branch = lambda name: (name, *reparam.conv_bn(reparam.child(params, name, path), stats.get(name), path + (name,)))
  identity = None
  if "rbr_identity" in params:
    identity = ("rbr_identity", reparam.batch_norm(params["rbr_identity"], stats.get("rbr_identity"),
                                                   path + ("rbr_identity",)))
  kernel, bias = reparam.fuse_branches(path, [branch("rbr_dense")], [branch("rbr_1x1")], identity, eps)
  kept = {"se": reparam.carry_over(params["se"], stats.get("se"), path + ("se",))} if "se" in params else {}
  return {"rbr_reparam": {"kernel": kernel, "bias": bias}, **kept}


FUSE = plan.FuseRule(lambda block: "rbr_dense" in block and "bn" not in block, fuse_block)


class RepVGG(models.PlainStackNetwork):
  """RepVGG: stage0..stage4 of RepVGG blocks, global average pool, a dense head."""

  num_blocks: Sequence[int] = dataclasses.field(kw_only=True)
  width_multiplier: Sequence[float] = dataclasses.field(kw_only=True)
  groups: int = 1
  use_se: bool = False

  def plan(self) -> list[BlockSpec]:
    return block_plan(self.num_blocks, self.width_multiplier, self.groups, self.use_se)

  def training_block(self, spec: BlockSpec, norm: Callable[..., nn.Module]) -> nn.Module:
    return RepVGGBlock(features=spec.features, strides=spec.strides, groups=spec.groups, use_se=spec.use_se,
                       norm=norm, dtype=self.dtype, name=spec.name)


# --------------------------------------------------------------------------- PyTorch keys.

LINEAR = re.compile(r"^linear\.")  # PyTorch Linear layers; other 2-D leaves (SE) are 1x1 convs.
TIMM_LINEAR = re.compile(r"^head\.fc\.")  # The same, in timm's naming.
# Official name piece -> timm name piece; applied to whole dot-separated components.
TIMM_RENAMES = {"rbr_dense": "conv_kxk", "rbr_1x1": "conv_1x1", "rbr_identity": "identity",
                "rbr_reparam": "reparam_conv", "se": "attn", "down": "fc1", "up": "fc2"}


BLOCK_KEY = (r"^(stage\d)_(\d+)$", r"\1.\2")  # A block's Flax name -> its PyTorch one: stage1_0 -> stage1.0.


def official_key(names: tuple[str, ...], renames: Optional[Mapping[str, str]] = None,
                 block_key: tuple[str, str] = BLOCK_KEY) -> str:
  """A Flax leaf's names (collection first) -> the official key: ('params', 'stage1_0', 'rbr_dense', 'conv',
  'kernel') -> 'stage1.0.rbr_dense.conv.weight'; ``renames`` maps Flax name pieces to the official ones,
  ``block_key`` (a regex and its replacement) writes a block's name."""
  block = re.sub(*block_key, names[1])
  renames = renames or {}
  return ".".join((block, *(renames.get(p, p) for p in names[2:-1]), torch_weights.LEAF_TO_TORCH[names[-1]]))


def official_to_timm(key: str, renames: Mapping[str, str] = TIMM_RENAMES) -> str:
  """'stage1.0.rbr_dense.conv.weight' -> 'stages.0.0.conv_kxk.conv.weight'; 'linear.x' -> 'head.fc.x'."""
  parts = key.split(".")
  if parts[0] == "linear":
    return ".".join(["head", "fc"] + parts[1:])
  head, rest = (["stem"], parts[1:]) if parts[0] == "stage0" else (
      ["stages", str(int(parts[0][len("stage"):]) - 1), parts[1]], parts[2:])
  return ".".join(head + [renames.get(p, p) for p in rest])


NAMINGS = {"official": torch_weights.Naming(lambda names, deploy: official_key(names), LINEAR.match),
           "timm": torch_weights.Naming(lambda names, deploy: official_to_timm(official_key(names)), TIMM_LINEAR.match)}


def official_decay(path: tuple[str, ...], _) -> bool:
  """RepVGG's official train.py: every kernel and the identity branch's BN scale; not biases, nor the BN scales
  of the conv branches (``.../bn/scale``)."""
  return path[-1] != "bias" and not (path[-1] == "scale" and "bn" in path)


BLOCKS = r"stage0|stage[1-4]_\d+"  # The block names of a RepVGG tree.


def create(name: str, variant: Variant, **kwargs) -> RepVGG:
  """``families.create_model`` of a RepVGG variant; overrides: ``num_blocks``, ``width_multiplier`` (a, a, a, b),
  ``groups``, ``use_se`` and the BatchNorms' ``bn_momentum``, ``bn_epsilon``, ``bn_axis_name``."""
  return models.create_plain_stack(RepVGG, name, variant, **kwargs)


FAMILY = plan.Family(
    name="repvgg", network=RepVGG, variants=VARIANTS, create=create, overridable=models.overridable(RepVGG),
    fuse_rules=(FUSE,), reparam=functools.partial(reparam.fuse_layers, rules=(FUSE,)),
    owns=lambda params: models.is_plain_stack(params, BLOCKS, FUSE, lambda sizes: sizes == {3}),
    namings=NAMINGS, decays=official_decay, timm_names=TIMM_NAMES, top1=TOP1, params_m=PARAMS_M)
