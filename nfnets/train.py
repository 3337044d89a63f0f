"""Command line: python -m nfnets.train --config=configs/f0.py --workdir=DIR.

Any config field can be overridden, e.g. --config.train.batch_size=256
--config.model.name=F1. Rerunning the same command resumes from the latest
checkpoint in --workdir. --dry_run prints the resolved config and the
model's size instead of training.

A mistake a user can fix (config, dataset, split, image folder, checkpoint,
class count: `nfnets.errors.UserError`) is one line on stderr, `error: ...`,
and exit status 2, found before anything is compiled.

The console shows this package's progress lines and library warnings and
errors; --config.train.log_level=info brings back the libraries' INFO lines
(orbax, tfds, TensorFlow start-up notices), =debug also full orbax
tracebacks of a failed checkpoint save or restore.
"""
import logging as py_logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nfnets import errors
from nfnets import runtime

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, logs and metrics (required '
    'unless --dry_run).')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print the resolved config (sizes, RandAugment, recipe, '
    'classes, splits) and the model\'s params and FLOPs, then exit: no '
    'training, no accelerator.')
flags.mark_flag_as_required('config')

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
    raise errors.ConfigError(f'config.train.log_level must be one of '
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


def _hides_info(log_level: str) -> bool:
  """Whether TensorFlow's native INFO notices are kept off the console."""
  return LEVELS[log_level] > py_logging.INFO


def report(error: BaseException, debug: bool) -> None:
  """Prints a user's mistake as one line, `error: ...` (after the traceback
  when `debug`), and exits with status 2."""
  if debug:
    traceback.print_exception(error)
  sys.stdout.flush()
  sys.exit(errors.report(error))


def _flag_error_message(error: Exception, argv) -> str:
  """What went wrong while parsing the flags, without absl's wrapping."""
  chain = [error]
  while chain[-1].__context__ is not None:
    chain.append(chain[-1].__context__)  # e.g. the config file's ValueError
  inner = next((e for e in chain if isinstance(e, (AttributeError, KeyError))),
               chain[-1])
  if isinstance(inner, (AttributeError, KeyError)):  # a misspelt field
    text = str(inner)
    key = re.search(r"'([^'\\]+)\\?'", text)
    key = key.group(1) if key else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    hint = f' Did you mean {hint.group(1)!r}?' if hint else ''
    flag = next((a.split('=')[0] for a in argv
                 if a.split('=')[0].endswith(f'.{key}')), key)
    return (f'{flag}: no such config field.{hint} Every field is declared, '
            'with a comment, in nfnets/config.py.')
  if inner is not error:
    flag = str(error).split(': ')[0]
    return f'{flag}: {type(inner).__name__}: {errors.one_line(inner)}'
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


def parse_flags(argv):
  """absl's flag parsing, with a mistake in a flag or in the config (file,
  misspelt field, bad value) reported as one line (see `report`)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    debug = '--config.train.log_level=debug' in argv
    if debug:
      traceback.print_exception(e)
    sys.exit(errors.report(_flag_error_message(e, argv)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  debug = config.train.log_level == 'debug'
  try:
    from nfnets import config as config_lib  # pylint: disable=g-import-not-at-top
    config_lib.validate(config)  # the fields that are set; cheap: no data yet
    configure_console(config.train.log_level)
    if _DRY_RUN.value:
      _dry_run(config)
      return
    if not _WORKDIR.value:
      raise errors.UserError('--workdir=DIR is required (checkpoints, logs '
                             'and metrics go there), unless --dry_run.')
    _train(config, _WORKDIR.value)
  except errors.UserError as e:
    report(e, debug)


def _dry_run(config) -> None:
  """Prints what `config` would run; JAX only traces, on the CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')  # no accelerator is touched
  with runtime.native_info_hidden(_hides_info(config.train.log_level)):
    import tensorflow  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  from nfnets.training import dry_run  # pylint: disable=g-import-not-at-top
  print(dry_run.summary(config))


def _train(config, workdir: str) -> None:
  """The process-wide settings of a training run, then the run."""
  # Before JAX starts its backend: glibc reuses XLA:CPU's temporaries
  # instead of page-faulting them in every step, synchronous CPU dispatch
  # (nfnets/runtime.py).
  cpu_runtime = runtime.configure_cpu_runtime()
  # TensorFlow only feeds the input pipeline (kept off any accelerator);
  # imported here so that its start-up notices are filtered.
  with runtime.native_info_hidden(_hides_info(config.train.log_level)):
    import tensorflow  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  runtime.keep_tensorflow_off_accelerators()
  if LEVELS[config.train.log_level] > py_logging.INFO:
    tfds.disable_progress_bar()
  # A failed restore's orbax leftovers are logged at DEBUG, not printed.
  from nfnets.checkpoints import run as run_checkpoints  # pylint: disable=g-import-not-at-top
  run_checkpoints.silence_restore_leftovers()
  from nfnets.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  logging.debug('CPU runtime tuning: %s', cpu_runtime)
  train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
