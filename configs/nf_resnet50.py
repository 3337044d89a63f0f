"""NF-ResNet-50 on ImageNet (arXiv 2101.08692 model, with AGC as in 2102.06171).

  python -m nfnets.train --config=configs/nf_resnet50.py --workdir=/tmp/nf_rn50

The NF-ResNet row of nfnets/recipes.py: SGD + Nesterov 0.9, lr 0.1 x
batch/256, 90 epochs, batch 4096 with AGC (lambda 0.01) -- the NF-ResNet-50
batch-size experiments of arXiv 2102.06171 Sec. 4.1 -- 5 warmup epochs and
cosine decay, weight decay 5e-5, label smoothing 0.1, no RandAugment / MixUp /
CutMix, 224 px train and eval, ReLU, dropout 0.25, stochastic depth 0.1.
The weight decay, label smoothing, dropout and stochastic-depth values are not
verified against the NF-ResNet paper's text (the release has no NF-ResNet
experiment config); override them on the command line as needed.
"""
from nfnets.config import base_config


def get_config():
  config = base_config('nf_resnet50')
  config.lock()
  return config
