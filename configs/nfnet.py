"""Any NFNet variant on ImageNet with the paper's recipe, the variant as argument.

  python -m nfnets.train --config=configs/nfnet.py:F3 --workdir=/tmp/nfnet_f3

The argument is a variant name (F0..F7, F0+..F7+; default F0). The recipe is
configs/f0.py's (arXiv 2102.06171: batch 4096, 360 epochs, SGD + Nesterov, AGC,
...); the train / eval image sizes, RandAugment level and dropout are the
variant's (nfnets.models.variants), filled in at run time by
nfnets.config.resolve unless set explicitly.
"""
from nfnets.config import base_config


def get_config(variant: str = 'F0'):
  config = base_config(variant or 'F0')
  config.lock()
  return config
