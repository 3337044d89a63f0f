"""NFNet-F0 on ImageNet with the paper's recipe (arXiv 2102.06171).

  python -m nfnets.train --config=configs/f0.py --workdir=/tmp/nfnet_f0

Batch 4096, 360 epochs, SGD + Nesterov, lr 0.1 x batch/256 with 5 warmup epochs
and cosine decay, weight decay 2e-5, AGC (lambda 0.01; classifier weight not
clipped), EMA, label smoothing 0.1, MixUp + CutMix + RandAugment '405', 192 px
train / 256 px eval, dropout 0.2, bf16 compute. Every knob is declared and
commented in nfnets/config.py.

Other variants, each with its own image sizes, RandAugment level and dropout:
`--config=configs/nfnet.py:F3`, or `--config.model.name=F3` on this file.
"""
from nfnets.config import base_config


def get_config():
  config = base_config('F0')
  config.lock()
  return config
