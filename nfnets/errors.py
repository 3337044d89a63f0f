"""The one error type for mistakes a user can fix (config, dataset, split,
image folder, checkpoint, class count).

`python -m nfnets.train` and scripts/ (eval, export, convert_checkpoint)
catch `UserError` once and print it as one line, `error: ...`, exit status
`EXIT_STATUS` (2, as argparse exits on a bad flag); with
`--config.train.log_level=debug` the traceback is shown too. Anything else
is a bug and keeps its traceback. A `UserError` is a `ValueError`, so code
that caught ValueError keeps working.
"""

import sys

EXIT_STATUS = 2


class UserError(ValueError):
  """Bad input: the message says what is wrong and what to do."""


class ConfigError(UserError):
  """A config field has a value that cannot work (the message names it)."""


class DataError(UserError):
  """The dataset, image folder or split asked for does not exist or fit."""


def one_line(error) -> str:
  """The message of `error` (an exception or a string) on one line (its
  lines joined)."""
  return ' '.join(l.strip() for l in str(error).splitlines() if l.strip())


def report(error) -> int:
  """Writes `error` (an exception or a message) to stderr as one line,
  `error: ...`, and returns `EXIT_STATUS` for the caller to exit with."""
  sys.stderr.write(f'error: {one_line(error)}\n')
  sys.stderr.flush()
  return EXIT_STATUS
