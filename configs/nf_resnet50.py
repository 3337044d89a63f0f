"""NF-ResNet-50 on ImageNet (arXiv 2101.08692 recipe, with AGC as in 2102.06171).

  python -m nfnets.train --config=configs/nf_resnet50.py --workdir=/tmp/nf_resnet50

Batch 4096 (AGC makes large batches stable), 360 epochs, 224 px train and test,
ReLU, no RandAugment. Every knob is listed and commented in nfnets/config.py.
"""
from nfnets.config import base_config


def get_config():
  config = base_config('F0')
  config.model.name = 'nf_resnet50'
  config.model.kwargs.stochdepth_rate = 0.1  # NF-ResNet paper value
  config.data.image_size = 224
  config.data.eval_image_size = 224
  config.data.randaug = ''  # no RandAugment
  config.data.mixup_alpha = 0.0  # no MixUp
  config.data.cutmix = False  # no CutMix
  config.lock()
  return config
