"""Command line: python -m nfnets.train --config=configs/f0.py --workdir=DIR.

Any config field can be overridden, e.g. --config.train.batch_size=256
--config.model.name=F1. Rerunning the same command resumes from the latest
checkpoint in --workdir.

The console shows this package's progress lines and library warnings and
errors; --config.train.log_level=info brings back the libraries' INFO lines
(orbax, tfds, TensorFlow start-up notices), =debug also full orbax
tracebacks of a failed checkpoint save or restore.
"""
import contextlib
import logging as py_logging
import os
import re
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, logs and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])

LEVELS = {'debug': py_logging.DEBUG, 'info': py_logging.INFO,
          'warning': py_logging.WARNING, 'error': py_logging.ERROR}
# TensorFlow's C++ logging (TF_CPP_MIN_LOG_LEVEL): 0 all, 1 no INFO, 2 errors.
_TF_CPP = {'debug': '0', 'info': '0', 'warning': '1', 'error': '2'}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class LibraryFilter(py_logging.Filter):
  """Passes this package's records at INFO and above, and other modules'
  (libraries') records at `level` and above."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= self.level:
      return True
    ours = (record.name.split('.')[0] == 'nfnets' or
            os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))
    return ours and record.levelno >= py_logging.INFO


def configure_console(log_level: str) -> None:
  """Our INFO lines plus library messages at `log_level` and above.

  Call before TensorFlow is imported (its C++ start-up notices are governed
  by TF_CPP_MIN_LOG_LEVEL, read once; an explicit value in the environment
  wins).
  """
  if log_level not in LEVELS:
    raise app.UsageError(f'config.train.log_level must be one of '
                         f'{sorted(LEVELS)}, got {log_level!r}.')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', _TF_CPP[log_level])
  logging.set_verbosity(logging.DEBUG if log_level == 'debug'
                        else logging.INFO)
  handlers = list(py_logging.getLogger().handlers)
  absl_handler = logging.get_absl_handler()
  if absl_handler not in handlers:
    handlers.append(absl_handler)
  for handler in handlers:
    for f in [f for f in handler.filters if isinstance(f, LibraryFilter)]:
      handler.removeFilter(f)
    handler.addFilter(LibraryFilter(LEVELS[log_level]))


# Native (C++) INFO lines: glog/absl format 'I1203 07:14:16.1 ...', and
# absl's notice that precedes the first of them.
_NATIVE_INFO = re.compile(r'^I\d{4} |^WARNING: All log messages before '
                          r'absl::InitializeLog\(\) is called')


@contextlib.contextmanager
def native_info_hidden(log_level: str):
  """Drops native INFO lines written to stderr (fd 2) inside the block and
  passes everything else through afterwards.

  TensorFlow 2.21 prints its oneDNN notice at import through absl C++
  logging, which ignores TF_CPP_MIN_LOG_LEVEL; this is the only way to keep
  it off the console without changing TensorFlow's numerics.
  """
  if LEVELS[log_level] <= py_logging.INFO:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode('utf-8', 'replace')
      kept = [l for l in text.splitlines(keepends=True)
              if not _NATIVE_INFO.match(l)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  configure_console(config.train.log_level)
  # Before JAX starts its backend: glibc reuses XLA:CPU's temporaries
  # instead of page-faulting them in every step, synchronous CPU dispatch
  # (nfnets/runtime.py).
  from nfnets import runtime
  cpu_runtime = runtime.configure_cpu_runtime()
  # TensorFlow only feeds the input pipeline (nfnets.data keeps it off any
  # accelerator); imported here so that its start-up notices are filtered.
  with native_info_hidden(config.train.log_level):
    import tensorflow  # noqa: F401  pylint: disable=unused-import
    import tensorflow_datasets as tfds
  if LEVELS[config.train.log_level] > py_logging.INFO:
    tfds.disable_progress_bar()
  from nfnets.checkpoints import CheckpointError
  from nfnets.training.loop import train_and_evaluate
  logging.info('CPU runtime tuning: %s', cpu_runtime)
  try:
    train_and_evaluate(config, _WORKDIR.value)
  except CheckpointError as e:
    # One clear message (what, which checkpoint, what to do) instead of a
    # traceback through orbax's threads; the message says how to see more.
    logging.error('%s', e)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
