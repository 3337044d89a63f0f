"""Errors raised when reading or validating checkpoints.

All derive from `CheckpointError` (a `nfnets.errors.UserError`, hence a
`ValueError`), so callers can catch one type; the subclasses say what went
wrong.
"""
from nfnets.errors import UserError


class CheckpointError(UserError):
  """A checkpoint could not be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
  """The pickle references a global that the safe loader does not allow.

  Attributes:
    global_name: the offending 'module.name'.
  """

  def __init__(self, message: str, global_name: str = ''):
    super().__init__(message)
    self.global_name = global_name


class TruncatedCheckpointError(CheckpointError):
  """The file ends early or is not a checkpoint in any supported format."""


class ParamMismatchError(CheckpointError):
  """Module paths, names, shapes or dtypes differ from the model's.

  Attributes:
    missing, unexpected, mismatched: lists of 'module:param' (with details
      for `mismatched`).
  """

  def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
    super().__init__(message)
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)


class VariantMismatchError(ParamMismatchError):
  """The file holds another variant than the one requested.

  Attributes:
    requested: the variant asked for; detected: the one the file looks like
      (None if it matches no known variant).
  """

  def __init__(self, message: str, requested=None, detected=None, **kwargs):
    super().__init__(message, **kwargs)
    self.requested = requested
    self.detected = detected


class CheckpointMismatchError(CheckpointError):
  """A run checkpoint was written for another model or config (different
  model name, number of classes or parameter shapes)."""


class CorruptCheckpointError(CheckpointError):
  """No run checkpoint under a directory could be read completely.

  Attributes:
    directory: the checkpoints directory; steps: the steps that were tried.
  """

  def __init__(self, message: str, directory: str = '', steps=()):
    super().__init__(message)
    self.directory = directory
    self.steps = list(steps)


class CheckpointSaveError(CheckpointError):
  """Writing a run checkpoint failed (disk full, permissions, ...)."""
