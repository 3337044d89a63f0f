"""Demo: a small NFNet on the embedded handwritten digits (no download).

  python -m nfnets.train --config=configs/demo.py --workdir=/tmp/nfnets_demo

sklearn's 1,797 8x8 digits, upscaled to 32x32, through the same tfds/tf.data
pipeline as ImageNet. An NFNet-F0 narrowed to 1/8 width with one block per
stage, trained with the paper's optimizer recipe (SGD + Nesterov, AGC, weight
decay, EMA, warmup + cosine). Reaches >= 95% test top-1 in a few minutes on
2 CPU cores.
"""
from nfnets import config as config_lib


def get_config():
  config = config_lib.base_config('F0')
  config_lib.use_demo_model(config)  # F0 at 1/8 width, one block per stage
  config_lib.use_digits(config)  # 10 classes, 32 px, batch 64

  config.optim.lr = 0.4  # x batch / 256
  config.optim.warmup_epochs = 1.0

  config.train.num_epochs = 30.0
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 200
  config.train.checkpoint_every_steps = 200
  config.lock()
  return config
