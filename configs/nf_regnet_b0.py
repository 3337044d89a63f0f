"""NF-RegNet-B0 on ImageNet with the release's NF-RegNet recipe.

  python -m nfnets.train --config=configs/nf_regnet_b0.py --workdir=/tmp/nf_b0

As DeepMind's release (`nfnets/experiment_nf_regnets.py`; models from
arXiv 2101.08692): batch 1024, 360 epochs, SGD + Nesterov 0.9 without AGC,
lr 0.4 (not scaled by the batch size) with 5 warmup epochs and cosine decay to
0.001, weight decay 5e-5 + 1e-5 per B-level, label smoothing 0.1, MixUp +
CutMix without RandAugment, EMA 0.99999, float32 compute, 192 px train /
224 px eval, dropout 0.2, stochastic depth 0.1. These come from the NF-RegNet
row of nfnets/recipes.py, so `--config.model.name=nf_regnet_b3` trains B3 with
B3's sizes, dropout and weight decay (8e-5).

Not reproduced: the release evaluates NF-RegNets with its 'crop_resize'
preprocessing; ours uses the NFNet evaluation crop.
"""
from nfnets.config import base_config


def get_config():
  config = base_config('nf_regnet_b0')
  config.model.compute_dtype = 'float32'  # the release: bfloat16=False
  config.lock()
  return config
