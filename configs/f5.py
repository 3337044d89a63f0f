"""NFNet-F5 on ImageNet with the paper's recipe (arXiv 2102.06171).

  python -m nfnets.train --config=configs/f5.py --workdir=/tmp/nfnet_f5

Batch 4096, 360 epochs, SGD + Nesterov, lr 0.1 x batch/256 with 5 warmup epochs
and cosine decay, weight decay 2e-5, AGC (lambda 0.01 at batch 4096), EMA,
label smoothing 0.1, MixUp + CutMix + RandAugment, bf16 compute. Every knob is
listed and commented in nfnets/config.py.
"""
from nfnets.config import base_config


def get_config():
  config = base_config('F5')  # sizes, RandAugment and dropout of F5
  config.lock()
  return config
