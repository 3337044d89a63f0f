"""Fine-tuning from a released or own checkpoint, on the embedded digits.

  # from a previous run of configs/demo.py (its EMA params), new classifier:
  python -m nfnets.train --config=configs/finetune.py \\
      --config.init.checkpoint=/tmp/nfnets_demo --workdir=/tmp/ft
  # from DeepMind's released F0 weights (any file load_pretrained reads),
  # body frozen (train only the classifier):
  python -m nfnets.train --config=configs/finetune.py:F0 \\
      --config.init.checkpoint=/path/F0_haiku.npz \\
      --config.train.freeze_body=True --workdir=/tmp/ft_f0
  # from timm's Hugging Face weights (timm/eca_nfnet_l0's model.safetensors):
  python -m nfnets.train --config=configs/finetune.py:eca_nfnet_l0 \
      --config.init.checkpoint=/path/model.safetensors --workdir=/tmp/ft_l0

The config argument picks the architecture of the checkpoint: 'demo' (the
default; configs/demo.py's 1/8-width F0) or a variant name such as 'F0'
(the released weights: F0..F5, F6; timm's dm_nfnet_f0..f6 files too) or
'eca_nfnet_l0'..'eca_nfnet_l2', 'nfnet_l0', 'timm_nf_resnet50' (timm's
files). The architecture must match the checkpoint; everything else is free.
Fields used by the loop:

  init.checkpoint        required: released pickle (loaded without running
                         code), our .npz / orbax dir, a training workdir, or
                         timm's model.safetensors
  init.params            'ema' | 'raw' (own checkpoints hold both)
  init.reset_classifier  True: the classifier is re-initialised for the
                         target's classes (N(0, 0.01) weights, zero bias --
                         zero-mean, as in the paper); the rest is loaded
  train.freeze_body      True: only the classifier is trained

The target task is the embedded digits dataset (10 classes, 32 px, no
download); for your own images override config.data.* (e.g.
--config.data.name=folder --config.data.data_dir=DIR, see README "Fine-tune
on your own images"); the classifier is sized from the dataset's classes
(model.num_classes left unset). Training uses the same loop and optimizer recipe
with fine-tuning settings: 10x lower learning rate than the demo, short
warm-up, no MixUp/CutMix/RandAugment, a few epochs.
"""
from nfnets import config as config_lib


def get_config(arg: str = 'demo'):
  arg = arg or 'demo'
  config = config_lib.base_config('F0' if arg == 'demo' else arg)
  if arg == 'demo':
    config_lib.use_demo_model(config)  # configs/demo.py's model
  config_lib.use_digits(config)  # 10 classes, 32 px, batch 64

  config.init.params = 'ema'
  config.init.reset_classifier = True
  config.train.freeze_body = False

  config.optim.lr = 0.04  # x batch / 256: 10x lower than the demo
  config.optim.warmup_epochs = 0.5
  config.optim.ema_decay = 0.999

  config.train.num_epochs = 5.0
  config.train.log_every_steps = 20
  config.train.eval_every_steps = 0
  config.train.checkpoint_every_steps = 0
  config.lock()
  return config
