"""Demo: a small NFNet on the embedded handwritten digits (no download).

  python -m nfnets.train --config=configs/demo.py --workdir=/tmp/nfnets_demo

sklearn's 1,797 8x8 digits, upscaled to 32x32, through the same tfds/tf.data
pipeline as ImageNet. An NFNet-F0 narrowed to 1/8 width with one block per
stage, trained with the paper's optimizer recipe (SGD + Nesterov, AGC, weight
decay, EMA, warmup + cosine). Reaches >= 95% test top-1 in a few minutes on
2 CPU cores.
"""
from nfnets.config import base_config


def get_config():
  config = base_config('F0')
  config.model.num_classes = 10
  # F0's architecture at 1/8 width (stages 32/64/192/192 channels), one block
  # per stage, groups of 16 channels.
  config.model.kwargs.width = 0.125
  config.model.kwargs.depth = (1, 1, 1, 1)
  config.model.kwargs.group_size = 16
  config.model.kwargs.stochdepth_rate = 0.0
  config.model.kwargs.drop_rate = 0.1
  config.model.compute_dtype = 'float32'

  config.data.name = 'digits'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.data.eval_image_size = 32
  config.data.randaug = ''  # digits are tiny: random crop (in the pipeline) only
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.data.label_smoothing = 0.1
  config.data.shuffle_buffer = 2000

  config.optim.lr_per_256 = 0.4
  config.optim.warmup_epochs = 1.0
  config.optim.weight_decay = 5e-5

  config.train.batch_size = 64
  config.train.num_epochs = 30.0
  config.train.eval_batch_size = 200
  config.train.log_every_steps = 50
  config.train.sync_every_steps = 10
  config.train.eval_every_steps = 200
  config.train.checkpoint_every_steps = 200
  config.lock()
  return config
