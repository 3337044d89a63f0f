"""Variant tables, as data (one row per variant).

NFNet F-series: Brock et al. 2021b (arXiv 2102.06171), Table 1 / Appendix;
F+ rows use the wider widths [384, 768, 2048, 2048] given there.
NF-RegNet B-series and NF-ResNets: Brock et al. 2021a (arXiv 2101.08692).
"""
import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """One row of a variant table.

  Attributes:
    name: canonical name accepted by `nfnets.models.build`.
    family: 'nfnet', 'nf_resnet', 'nf_regnet' or 'nfnet_l'.
    width: output channels of each of the four stages.
    depth: number of blocks of each stage.
    train_size: training image size (px).
    test_size: evaluation image size (px).
    randaug: RandAugment level ('405' = 4 layers, magnitude 5), or None.
    dropout: dropout rate before the classifier.
    use_se: squeeze-excite in every block (NF-ResNets: the -SE variants).
    attention: 'nfnet_l' rows: 'eca' or 'se' after each block's last conv.
    final_conv_mult: 'nfnet_l' rows: head conv width / last stage width.
    timm_name: timm's model name whose pretrained state dict loads into this
      variant (nfnets.checkpoints.timm), or None.
  """
  name: str
  family: str
  width: Tuple[int, int, int, int]
  depth: Tuple[int, int, int, int]
  train_size: int
  test_size: int
  randaug: Optional[str]
  dropout: float
  use_se: bool = True
  attention: Optional[str] = None
  final_conv_mult: Optional[float] = None
  timm_name: Optional[str] = None


_F_WIDTH = (256, 512, 1536, 1536)
_F_PLUS_WIDTH = (384, 768, 2048, 2048)

# name: (depth, train px, test px, RandAugment, dropout) -- the paper's table.
_NFNET_ROWS = {
    'F0': ((1, 2, 6, 3), 192, 256, '405', 0.2),
    'F1': ((2, 4, 12, 6), 224, 320, '410', 0.3),
    'F2': ((3, 6, 18, 9), 256, 352, '410', 0.4),
    'F3': ((4, 8, 24, 12), 320, 416, '415', 0.4),
    'F4': ((5, 10, 30, 15), 384, 512, '415', 0.5),
    'F5': ((6, 12, 36, 18), 416, 544, '415', 0.5),
    'F6': ((7, 14, 42, 21), 448, 576, '415', 0.5),
    'F7': ((8, 16, 48, 24), 480, 608, '415', 0.5),
}

# timm's own 'light' NFNets (timm/models/nfnet.py; not in the papers): widths
# _F_WIDTH, SiLU, group size 64, bottleneck 0.25, timm's weight-standardised
# convs. name: (depth, head conv mult, attention, train px, test px); the
# RandAugment level and dropout are taken from the F-row of the same depths
# (timm trained them with its own ra2/ra3 recipes).
_NFNET_L_ROWS = {
    'eca_nfnet_l0': ((1, 2, 6, 3), 1.5, 'eca', 224, 288, 'F0'),
    'eca_nfnet_l1': ((2, 4, 12, 6), 2.0, 'eca', 256, 320, 'F1'),
    'eca_nfnet_l2': ((3, 6, 18, 9), 2.0, 'eca', 320, 384, 'F2'),
    'nfnet_l0': ((1, 2, 6, 3), 1.5, 'se', 224, 288, 'F0'),
}

# NF-RegNet (arXiv 2101.08692 appendix): widths, depths, train/test px, dropout.
_NF_REGNET_ROWS = {
    'B0': ((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    'B1': ((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    'B2': ((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    'B3': ((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    'B4': ((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    'B5': ((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    'B6': ((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    'B7': ((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    'B8': ((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}

# NF-ResNet depths (standard bottleneck ResNets; ResNet-26 as in timm/the paper's
# small model), 224 px, output widths 256..2048, dropout 0.25 as in the release.
_NF_RESNET_DEPTHS = {
    '26': (2, 2, 2, 2),
    '50': (3, 4, 6, 3),
    '101': (3, 4, 23, 3),
    '152': (3, 8, 36, 3),
    '200': (3, 24, 36, 3),
}


def _make_table():
  table = {}
  for name, (depth, train, test, ra, drop) in _NFNET_ROWS.items():
    timm_name = f'dm_nfnet_{name.lower()}' if name != 'F7' else None
    table[name] = VariantSpec(name, 'nfnet', _F_WIDTH, depth, train, test, ra,
                              drop, timm_name=timm_name)
    table[name + '+'] = VariantSpec(name + '+', 'nfnet', _F_PLUS_WIDTH, depth,
                                    train, test, ra, drop)
  for name, (depth, mult, attn, train, test, like) in _NFNET_L_ROWS.items():
    ra, drop = _NFNET_ROWS[like][3:]
    table[name] = VariantSpec(name, 'nfnet_l', _F_WIDTH, depth, train, test,
                              ra, drop, use_se=attn == 'se', attention=attn,
                              final_conv_mult=mult, timm_name=name)
  # timm's own NF-ResNet-50 (nf_resnet_timm.py): its pretrained weights
  # were trained at 256 px and are evaluated at 288 (timm's config).
  table['timm_nf_resnet50'] = VariantSpec(
      'timm_nf_resnet50', 'nf_resnet_timm', (256, 512, 1024, 2048),
      _NF_RESNET_DEPTHS['50'], 256, 288, None, 0.25, use_se=False,
      timm_name='nf_resnet50')
  for depth_name, depth in _NF_RESNET_DEPTHS.items():
    for se in (False, True):
      name = f'nf_{"se" if se else ""}resnet{depth_name}'
      table[name] = VariantSpec(name, 'nf_resnet', (256, 512, 1024, 2048),
                                depth, 224, 224, None, 0.25, use_se=se)
  for b, (width, depth, train, test, drop) in _NF_REGNET_ROWS.items():
    name = f'nf_regnet_{b.lower()}'
    table[name] = VariantSpec(name, 'nf_regnet', width, depth, train, test,
                              None, drop)
  return table


VARIANTS = _make_table()

_FAMILY_NAMES = {'nfnet': 'NFNet', 'nf_resnet': 'NF-ResNet',
                 'nf_regnet': 'NF-RegNet', 'nfnet_l': 'NFNet-L',
                 'nf_resnet_timm': 'NF-ResNet (timm)'}


def family_variant(variant: str, family: str) -> VariantSpec:
  """The table row of `variant`, which must belong to `family`.

  Args:
    variant: canonical variant name (e.g. 'F0', 'nf_resnet50').
    family: 'nfnet', 'nf_resnet' or 'nf_regnet'.
  Raises:
    ValueError: naming the family's valid variants.
  """
  spec = VARIANTS.get(variant)
  if spec is None or spec.family != family:
    valid = [k for k, v in VARIANTS.items() if v.family == family]
    raise ValueError(f'Unknown {_FAMILY_NAMES[family]} variant {variant!r}; '
                     f'valid: {", ".join(valid)}.')
  return spec
