"""Command line: python -m nfnets.train --config=configs/f0.py --workdir=DIR.

Any config field can be overridden, e.g. --config.train.batch_size=256
--config.model.name=F1. Rerunning the same command resumes from the latest
checkpoint in --workdir.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, logs and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before JAX starts its backend: glibc reuses XLA:CPU's temporaries
  # instead of page-faulting them in every step, synchronous CPU dispatch
  # (nfnets/runtime.py).
  from nfnets import runtime
  cpu_runtime = runtime.configure_cpu_runtime()
  # Hide the accelerator from TensorFlow: it only feeds the input pipeline.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  from nfnets.training.loop import train_and_evaluate
  logging.set_verbosity(logging.INFO)
  logging.info('CPU runtime tuning: %s', cpu_runtime)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
