"""Training recipes per model family, as data (used by `nfnets.config.resolve`).

A config field left as None ("the family's default") is filled from the row
of the model's family, so `--config.model.name=nf_regnet_b3` trains with the
NF-RegNet recipe at B3's weight decay, and `--config.model.name=F3` with the
NFNet recipe at F3's sizes and RandAugment level (those per-variant values
live in `nfnets.models.variants`).

Sources:
  * nfnet: arXiv 2102.06171 Sec. 4 / Appendix and DeepMind's release
    (`nfnets/experiment_nfnets.py`): batch 4096, 360 epochs, SGD + Nesterov
    0.9, lr 0.1 x batch / 256, 5 warmup epochs, cosine to 0, weight decay
    2e-5, AGC lambda 0.01, MixUp + CutMix + RandAugment (per variant).
  * nf_regnet: the release's `nfnets/experiment_nf_regnets.py`: batch 1024,
    360 epochs, plain SGD + Nesterov 0.9 (no AGC), lr 0.4 (not scaled by the
    batch size), 5 warmup epochs, cosine to 0.001, weight decay 5e-5 + 1e-5
    per B-level (the release lists B0..B5; B6..B8 follow the same rule here),
    MixUp + CutMix without RandAugment, float32 compute (set
    `model.compute_dtype='float32'` to match; the family row does not change
    the compute dtype).
  * nf_resnet: arXiv 2102.06171 Sec. 4.1 (the NF-ResNet-50 batch-size
    experiments with AGC): SGD + Nesterov, 90 epochs, lr 0.1 per 256
    examples scaled linearly, batch up to 4096 with AGC. Weight decay 5e-5 is
    the NF-ResNet paper's (arXiv 2101.08692) value as we recall it, not
    verified against the paper's text; no RandAugment / MixUp / CutMix.
"""
import dataclasses
from typing import Callable, Dict, Optional, Union

from nfnets.models.variants import VariantSpec


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A family's training recipe (the fields `resolve` may fill).

  Attributes:
    batch_size: global batch size (`train.batch_size`).
    num_epochs: epochs (`train.num_epochs`).
    lr: base learning rate (`optim.lr`).
    lr_scaling: 'linear' (peak = lr x batch / 256) or 'none'
      (`optim.lr_scaling`).
    weight_decay: `optim.weight_decay`, or a function of the variant.
    use_agc: adaptive gradient clipping on/off (`optim.use_agc`).
    cosine_end_lr: the lr the cosine ends at (`optim.cosine_end_lr`).
    mixup_alpha: MixUp Beta(a, a) parameter, 0 = off (`data.mixup_alpha`).
    cutmix: CutMix on half of each batch (`data.cutmix`).
    randaug: True = the variant's level from the variant table; False =
      no RandAugment (`data.randaug`).
  """
  batch_size: int
  num_epochs: float
  lr: float
  lr_scaling: str
  weight_decay: Union[float, Callable[[VariantSpec], float]]
  use_agc: bool
  cosine_end_lr: float
  mixup_alpha: float
  cutmix: bool
  randaug: bool


def _nf_regnet_weight_decay(spec: VariantSpec) -> float:
  """5e-5 + 1e-5 per B-level (the release: B0 5e-5 ... B5 1e-4)."""
  level = int(spec.name.rsplit('_b', 1)[1])
  return round(5e-5 + 1e-5 * level, 10)


RECIPES: Dict[str, Recipe] = {
    'nfnet': Recipe(batch_size=4096, num_epochs=360.0, lr=0.1,
                    lr_scaling='linear', weight_decay=2e-5, use_agc=True,
                    cosine_end_lr=0.0, mixup_alpha=0.2, cutmix=True,
                    randaug=True),
    'nf_regnet': Recipe(batch_size=1024, num_epochs=360.0, lr=0.4,
                        lr_scaling='none',
                        weight_decay=_nf_regnet_weight_decay, use_agc=False,
                        cosine_end_lr=0.001, mixup_alpha=0.2, cutmix=True,
                        randaug=False),
    'nf_resnet': Recipe(batch_size=4096, num_epochs=90.0, lr=0.1,
                        lr_scaling='linear', weight_decay=5e-5, use_agc=True,
                        cosine_end_lr=0.0, mixup_alpha=0.0, cutmix=False,
                        randaug=False),
}
# timm's NFNet-L variants (nfnet_l.py) train with the F-series recipe here;
# timm's own ra2/ra3 recipes are not reproduced.
RECIPES['nfnet_l'] = RECIPES['nfnet']
RECIPES['nf_resnet_timm'] = RECIPES['nf_resnet']  # timm's nf_resnet50


def recipe_for(spec: VariantSpec) -> Recipe:
  """The recipe of `spec`'s family."""
  if spec.family not in RECIPES:
    raise ValueError(f'No training recipe for family {spec.family!r} '
                     f'(variant {spec.name}); known: {sorted(RECIPES)}.')
  return RECIPES[spec.family]


def defaults_for(spec: VariantSpec) -> Dict[str, object]:
  """Every value `resolve` may fill, as {'section.field': value} for `spec`.

  Per-variant values come from the variant table (image sizes, RandAugment,
  dropout) and the family recipe (the rest, incl. NF-RegNet's weight decay).
  """
  r = recipe_for(spec)
  wd = r.weight_decay(spec) if callable(r.weight_decay) else r.weight_decay
  randaug: Optional[str] = (spec.randaug or '') if r.randaug else ''
  return {
      'data.image_size': spec.train_size,
      'data.eval_image_size': spec.test_size,
      'data.randaug': randaug,
      'data.mixup_alpha': r.mixup_alpha,
      'data.cutmix': r.cutmix,
      'model.kwargs.drop_rate': spec.dropout,
      'train.batch_size': r.batch_size,
      'train.num_epochs': r.num_epochs,
      'optim.lr': r.lr,
      'optim.lr_scaling': r.lr_scaling,
      'optim.weight_decay': wd,
      'optim.use_agc': r.use_agc,
      'optim.cosine_end_lr': r.cosine_end_lr,
  }
