"""Helpers shared by the training tests: a tiny, fast config on digits."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(num_steps=6, batch_size=16):
  """configs/demo.py shrunk to a few steps of a very small NFNet."""
  sys.path.insert(0, REPO)
  from configs import demo
  config = demo.get_config()
  config.unlock()
  config.model.kwargs.width = 0.0625  # stages of 16/32/96/96 channels
  config.model.kwargs.group_size = 8
  config.model.kwargs.drop_rate = 0.0
  config.train.num_steps = num_steps
  config.train.batch_size = batch_size
  config.train.eval_batch_size = 64
  config.train.log_every_steps = 2
  config.train.sync_every_steps = 1
  config.train.eval_every_steps = 0
  config.train.checkpoint_every_steps = 3
  config.train.async_checkpointing = False
  config.data.image_size = 16
  config.data.eval_image_size = 16
  config.optim.warmup_epochs = 0.0
  config.lock()
  return config


def run_train_subprocess(args, env_extra=None, **kwargs):
  env = dict(os.environ)
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, '-m', 'nfnets.train'] + args,
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)
