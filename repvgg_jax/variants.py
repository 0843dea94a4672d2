"""The official RepVGG variants (Ding et al., CVPR 2021, Table 2 and the official repository), and MobileOne's
(Vasu et al., CVPR 2023, Table 2; apple/ml-mobileone).

A variant is fixed by four numbers per stage and two flags:
  * ``num_blocks``: blocks in stage1..stage4 (stage0 is always one block);
  * ``width_multiplier``: (a, a, a, b); stage widths are 64a, 128a, 256a, 512b and stage0 is min(64, 64a);
  * ``groups``: the gN variants use N-group convolutions in layers 2, 4, ..., 26, counting blocks from 1 at
    stage1's first block (stage0 is never grouped);
  * ``use_se``: D2se puts squeeze-and-excitation on the sum of the branches, before the ReLU.

A MobileOne variant: a 3x3 stride-2 stem block of min(64, 64 w1) channels, then per stage (depths 2, 8, 10,
1; widths 64 w1, 128 w2, 256 w3, 512 w4) pairs of a depthwise 3x3 block (stride 2 for a stage's first pair)
and a pointwise 1x1 block; every block trains with ``num_conv_branches`` (k) conv+BN branches, a 1x1 scale
branch (3x3 blocks only) and an identity BN where shapes allow; the last ``se_blocks`` pairs of a stage
have SE. S0 uses k = 4, S1-S4 k = 1; S4 puts SE on the last 5 pairs of stage3 and on stage4.

QARepVGG-A0 .. B3g4 have RepVGG's shapes and the quantization-friendly block (``quantization_friendly``).

RepVGGplus-L2pse (DingXiaoH/RepVGG, repvggplus.py): RepVGG blocks at depths (8, 14, 24, 1) and widths (2.5, 2.5,
2.5, 5) with squeeze-and-excitation after each block's ReLU ("post SE", C -> C/4 -> C, kept in the deploy form);
stage3 is split into halves ``stage3_first`` and ``stage3_second``, and the training form adds auxiliary
classifiers after stage1, stage2 and stage3_first.
"""

import dataclasses

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
  quantization_friendly: bool = False  # QARepVGG's block instead of RepVGG's.

  def groups_map(self) -> dict[int, int]:
    """Layer index (1 = stage1's first block) -> number of groups, for grouped layers only."""
    if self.groups == 1:
      return {}
    return {layer: self.groups for layer in GROUPWISE_LAYERS}


@dataclasses.dataclass(frozen=True)
class MobileOneVariant:
  width_multiplier: tuple[float, float, float, float]
  num_conv_branches: int = 1
  se_blocks: tuple[int, int, int, int] = (0, 0, 0, 0)
  num_blocks: tuple[int, int, int, int] = (2, 8, 10, 1)


@dataclasses.dataclass(frozen=True)
class RepVGGplusVariant:
  num_blocks: tuple[int, int, int, int] = D_DEPTHS
  width_multiplier: tuple[float, float, float, float] = (2.5, 2.5, 2.5, 5)
  use_post_se: bool = True


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
    "MobileOne-S0": MobileOneVariant((0.75, 1.0, 1.0, 2.0), num_conv_branches=4),
    "MobileOne-S1": MobileOneVariant((1.5, 1.5, 2.0, 2.5)),
    "MobileOne-S2": MobileOneVariant((1.5, 2.0, 2.5, 4.0)),
    "MobileOne-S3": MobileOneVariant((2.0, 2.5, 3.0, 4.0)),
    "MobileOne-S4": MobileOneVariant((3.0, 3.5, 3.5, 4.0), se_blocks=(0, 0, 5, 1)),
    "RepVGGplus-L2pse": RepVGGplusVariant(),
}
# QARepVGG (Chu et al., 2022; cxxgtxy/QARepVGG): RepVGG's shapes with the quantization-friendly block. No D2se:
# its SE sits between the branch sum and the block's BN, which no fusion can fold.
VARIANTS.update({"QA" + name: dataclasses.replace(variant, quantization_friendly=True)
                 for name, variant in list(VARIANTS.items()) if name.startswith("RepVGG-") and not variant.use_se})


def of_kind(kind: type, quantization_friendly: bool = False) -> dict:
  """The variants of one record type (QARepVGG's: RepVGG's records with ``quantization_friendly``), in order."""
  return {name: v for name, v in VARIANTS.items()
          if type(v) is kind and getattr(v, "quantization_friendly", False) == quantization_friendly}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One block of a network: its parameter-tree name, output channels, stride, groups, kernel size, number of
  kxk conv branches and whether it has SE (before or after its ReLU)."""
  name: str
  features: int
  strides: int
  groups: int
  kernel_size: int = 3
  num_conv_branches: int = 1
  use_se: bool = False
  post_se: bool = False  # RepVGGplus: SE (C -> C/4 -> C) after the ReLU.

  @property
  def stage(self) -> int:
    """0 for the stem, 1..4 for the stages: the digit after 'stage' in the name."""
    return int(self.name[len("stage")])


def block_plan(num_blocks, width_multiplier, groups: int = 1, use_se: bool = False) -> list[BlockSpec]:
  """The blocks of a network, stage0 first, exactly as the official ``RepVGG._make_stage`` lays them out.

  Block names are ``stage0`` and ``stage{s}_{i}`` (the official PyTorch ``stage{s}.{i}``). Every stage
  starts with a stride-2 block.
  """
  a = width_multiplier
  widths = (int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(512 * a[3]))
  grouped = set(GROUPWISE_LAYERS) if groups > 1 else set()
  plan = [BlockSpec("stage0", min(64, int(64 * a[0])), 2, 1, use_se=use_se)]
  layer = 1
  for stage, (depth, width) in enumerate(zip(num_blocks, widths), start=1):
    for i in range(depth):
      spec = BlockSpec(f"stage{stage}_{i}", width, 2 if i == 0 else 1, groups if layer in grouped else 1,
                       use_se=use_se)
      in_channels = plan[-1].features
      if in_channels % spec.groups or spec.features % spec.groups:
        raise ValueError(f"{spec.name}: {spec.groups} groups do not divide its {in_channels} input and "
                         f"{spec.features} output channels; choose width_multiplier or groups to match.")
      plan.append(spec)
      layer += 1
  return plan


def mobileone_block_plan(num_blocks, width_multiplier, num_conv_branches: int = 1,
                         se_blocks=(0, 0, 0, 0)) -> list[BlockSpec]:
  """MobileOne's blocks, stem first, as apple/ml-mobileone lays them out: ``stage{s}_{j}`` is its
  ``stage{s}.{j}``, even j a depthwise 3x3 block, odd j the pointwise 1x1 block after it."""
  w = width_multiplier
  channels = min(64, int(64 * w[0]))
  plan = [BlockSpec("stage0", channels, 2, 1)]  # The stem has one conv branch in every variant.
  for stage, (depth, width, se) in enumerate(zip(num_blocks, (64, 128, 256, 512), se_blocks), start=1):
    out = int(width * w[stage - 1])
    for i in range(depth):
      use_se = i >= depth - se
      plan.append(BlockSpec(f"stage{stage}_{2 * i}", channels, 2 if i == 0 else 1, channels, 3, num_conv_branches,
                            use_se))
      plan.append(BlockSpec(f"stage{stage}_{2 * i + 1}", out, 1, 1, 1, num_conv_branches, use_se))
      channels = out
  return plan


REPVGGPLUS_STAGES = ("stage1", "stage2", "stage3_first", "stage3_second", "stage4")


def repvggplus_block_plan(num_blocks, width_multiplier, use_post_se: bool = True) -> list[BlockSpec]:
  """RepVGGplus's blocks as the official ``RepVGGplus`` lays them out: ``stage0``, then ``{stage}_{i}`` (the
  official ``{stage}.blocks.{i}``) for stage1, stage2, stage3_first, stage3_second (each half of stage3's
  blocks; only the first halves the resolution) and stage4."""
  if num_blocks[2] % 2:
    raise ValueError(f"RepVGGplus splits stage3 into two halves: num_blocks[2] must be even; got {num_blocks[2]}.")
  a = width_multiplier
  widths = (int(64 * a[0]), int(128 * a[1]), int(256 * a[2]), int(256 * a[2]), int(512 * a[3]))
  depths = (num_blocks[0], num_blocks[1], num_blocks[2] // 2, num_blocks[2] // 2, num_blocks[3])
  plan = [BlockSpec("stage0", min(64, int(64 * a[0])), 2, 1, post_se=use_post_se)]
  for stage, depth, width in zip(REPVGGPLUS_STAGES, depths, widths):
    first_stride = 1 if stage == "stage3_second" else 2
    plan += [BlockSpec(f"{stage}_{i}", width, first_stride if i == 0 else 1, 1, post_se=use_post_se)
             for i in range(depth)]
  return plan
