"""Checkpoints of our own training runs (orbax): async, atomic, keep-last-N,
validated on restore, layout-independent, falling back past corrupt ones.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. 'state' is the mapping
{'params', 'opt_state', 'ema_params', 'step', 'nonfinite'} in its logical
(unstacked, unreplicated) form, so a checkpoint written by one device layout
(pmap, jit + sharding, one host or many) restores into any other. 'meta'
records what the state belongs to (model, classes, parameter shapes); a
restore into a different model fails with `CheckpointMismatchError` naming the
difference instead of an orbax shape error.

orbax writes each step into a temporary directory and renames it when
complete, so a crash or `kill -9` mid-save leaves the previous checkpoints
intact. A finished checkpoint that later turns out unreadable (a truncated or
damaged file) is moved aside to WORKDIR/checkpoints_corrupt/<step>-<time>
(never deleted) and the newest checkpoint that restores completely is used,
with one warning naming both.
"""
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nfnets.checkpoints.errors import (CheckpointMismatchError,
                                       CheckpointSaveError,
                                       CorruptCheckpointError)

log = logging.getLogger(__name__)

STATE_FIELDS = ('params', 'opt_state', 'ema_params', 'step', 'nonfinite')
CORRUPT_DIR = 'checkpoints_corrupt'


def tree_signature(params) -> Dict[str, Any]:
  """Paths, shapes and dtypes of a param tree, with a short digest.

  Leaves may be numpy arrays, jax.Arrays or jax.ShapeDtypeStructs.
  """
  flat = {jax.tree_util.keystr(p): [list(np.shape(v)) if not hasattr(
      v, 'shape') else list(v.shape), str(np.dtype(v.dtype)) if hasattr(
          v, 'dtype') else str(np.asarray(v).dtype)]
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
  return {'num_params': int(sum(np.prod(s) for s, _ in flat.values())),
          'digest': digest[:16], 'leaves': flat}


def state_as_mapping(state) -> Dict[str, Any]:
  """A TrainState-like NamedTuple or mapping -> {field: value} (all five)."""
  if hasattr(state, '_asdict'):
    state = state._asdict()
  if not isinstance(state, Mapping):
    raise TypeError(f'state must be a mapping or NamedTuple with fields '
                    f'{STATE_FIELDS}, got {type(state).__name__}.')
  missing = [k for k in STATE_FIELDS if k not in state]
  if missing:
    raise TypeError(f'state lacks {missing}; expected fields {STATE_FIELDS}.')
  return {k: state[k] for k in STATE_FIELDS}


def _save_leaf(x):
  """Sharded jax.Arrays are saved as they are (each host writes its shards,
  no gather). A replicated one is saved as numpy from this host's copy, as
  pmap states are: orbax would split its write over the replicas, compiling
  a slice per device and shape (FSDP's many small replicated leaves)."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated and len(x.sharding.device_set) > 1:
      return np.asarray(x.addressable_data(0))
    return x
  if isinstance(x, np.ndarray):
    return x
  return np.asarray(x)


def _restore_leaf(x):
  """What orbax should restore a target leaf as.

  jax.Array -> a jax.Array with its sharding; ShapeDtypeStruct with a
  sharding -> that; anything else (numpy, scalars, ShapeDtypeStruct without
  sharding) -> host numpy. The numpy placeholder is a zero-stride view, so a
  target costs no memory.
  """
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct):
    if getattr(x, 'sharding', None) is not None:
      return x
    return np.broadcast_to(np.zeros((), x.dtype), x.shape)
  x = np.asarray(x)
  return np.broadcast_to(np.zeros((), x.dtype), x.shape)


def _short(e: BaseException, limit: int = 400) -> str:
  """The first line of an exception, bounded (orbax errors can be huge)."""
  text = str(e).strip().splitlines()
  text = text[0] if text else ''
  if len(text) > limit:
    text = text[:limit] + ' ...'
  return f'{type(e).__name__}: {text}'


def _is_restore_leftover(unraisable) -> bool:
  """An orbax read coroutine of a failed restore, or its late callback."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return True
  code = getattr(unraisable.object, 'cr_code', None)
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def silence_restore_leftovers() -> None:
  """Logs at DEBUG, instead of printing, what a failed orbax restore leaves.

  After a failed restore, its other array reads fail too, and Python prints
  each, when the coroutine is collected or calls back into orbax's closed
  asyncio loop, as an 'Exception ignored in ...' traceback (thousands of
  lines for a model). This filters those (and only those: orbax coroutines,
  'Event loop is closed') from sys.unraisablehook, sys.excepthook, asyncio's
  logger and the warnings filters: process-wide settings, so a program's
  `main` calls it (`python -m nfnets.train` does), not the library. The
  reports can arrive while a failing restore unwinds and until the process
  exits, so it stays installed; calling it again is harmless.
  """
  previous = sys.unraisablehook
  if getattr(previous, '_nfnets_filter', False):
    return

  def hook(unraisable):
    if _is_restore_leftover(unraisable):
      log.debug('Ignored after a failed restore: %s', unraisable.exc_value)
      return
    previous(unraisable)
  hook._nfnets_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
  # tensorstore's callback threads report the same 'Event loop is closed'
  # through sys.excepthook (PyErr_Print), as a bare traceback.
  previous_excepthook = sys.excepthook

  def excepthook(etype, value, tb):
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      log.debug('Ignored after a failed restore: %s', value)
      return
    previous_excepthook(etype, value, tb)
  sys.excepthook = excepthook
  # The same reads, when their task is collected: asyncio logs 'Task
  # exception was never retrieved' with the full traceback, and Python warns
  # that the coroutine was never awaited.
  logging.getLogger('asyncio').addFilter(_OrbaxTaskFilter())
  warnings.filterwarnings(
      'ignore', message=r"coroutine '_read_array_index_and_device_put' was "
      'never awaited', category=RuntimeWarning)


class _OrbaxTaskFilter(logging.Filter):
  """Drops asyncio's reports of orbax / tensorstore reads ('never retrieved',
  'unhandled exception during asyncio.run() shutdown')."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    reported = ('never retrieved' in msg or
                'unhandled exception during asyncio.run() shutdown' in msg)
    if reported and (f'{os.sep}orbax{os.sep}' in msg or 'OCDBT' in msg or
                     'TensorStore' in msg):
      log.debug('Ignored after a failed restore: %s', msg.splitlines()[0])
      return False
    return True


def _all_processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process (a collective on several hosts)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.all(flags))


class RunCheckpointer:
  """Saves/restores a training run's state under WORKDIR/checkpoints.

  Args:
    workdir: run directory.
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (the step loop continues).
  """

  def __init__(self, workdir: str, max_to_keep: int = 3,
               async_save: bool = True):
    self.workdir = epath.Path(workdir)
    self.directory = self.workdir / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))
    # orbax removes unfinished temporary dirs in a background thread; wait
    # for it, so that a run that fails right away does not end with that
    # thread's 'cannot schedule new futures after shutdown' traceback.
    await_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory',
                            None)
    if await_cleanup is not None:
      await_cleanup()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, meta: Dict[str, Any]) -> None:
    """Queues a save of `state` (returns once the device->host copy is done).

    Args:
      step: the step number (the checkpoint's name).
      state: TrainState or mapping with the STATE_FIELDS, in its logical
        (unstacked) form; leaves are host numpy or jax.Arrays of any
        sharding, saved without gathering (each host writes its shards;
        replicated arrays are written once).
      meta: what the state belongs to ('model', 'num_classes', ...).
    Raises:
      CheckpointSaveError: this or an earlier async save failed.
    """
    state = jax.tree.map(_save_leaf, state_as_mapping(state))
    meta = dict(meta, signature=tree_signature(state['params']),
                step=int(step))
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None
    if not saved:
      log.warning('Checkpoint step %d was not saved: %s already holds step '
                  '%s.', step, self.directory, self.latest_step())

  def _save_error(self, step, e) -> CheckpointSaveError:
    log.debug('Checkpoint save failed', exc_info=e)
    return CheckpointSaveError(
        f'Saving the checkpoint of step {step} under {self.directory} failed '
        f'({_short(e)}). Check free disk space and write permission there; '
        'the previous checkpoints are intact (saves are atomic). Rerun with '
        '--config.train.log_level=debug for the full orbax traceback.')

  def restore(self, target, meta: Dict[str, Any], step: Optional[int] = None):
    """Restores the newest readable checkpoint into `target`'s structure and
    shardings.

    Args:
      target: TrainState or mapping with the STATE_FIELDS; leaves are
        jax.Arrays or jax.ShapeDtypeStructs with a sharding (restored as
        jax.Arrays laid out like them) or numpy / ShapeDtypeStructs without
        one (restored as host numpy).
      meta: what the run expects ('model', 'num_classes', ...).
      step: restore exactly this step (no fallback); None = the newest
        checkpoint that restores completely.
    Returns:
      The state, of the same type as `target`.
    Raises:
      CheckpointMismatchError: written for another model (nothing is moved).
      CorruptCheckpointError: no checkpoint could be read.
    """
    fields = state_as_mapping(target)
    expected = dict(meta, signature=tree_signature(fields['params']))
    restore_target = jax.tree.map(_restore_leaf, fields)
    steps = [step] if step is not None else self.all_steps()[::-1]
    if not steps:
      raise CorruptCheckpointError(f'No checkpoint under {self.directory}.',
                                   str(self.directory))
    failures = []
    for s in steps:
      restored, error = self._try_restore(s, restore_target, expected)
      if _all_processes_agree(error is None):
        if failures:
          moved = self._move_aside([f for f, _ in failures])
          log.warning(
              'Checkpoint(s) %s could not be read (%s) and were moved to %s; '
              'resuming from step %d.', ', '.join(str(f) for f, _ in failures),
              failures[0][1], ', '.join(moved), s)
        return _like(target, restored)
      failures.append((s, error or 'unreadable on another host'))
    listing = '; '.join(f'step {s}: {err}' for s, err in failures)
    raise CorruptCheckpointError(
        f'None of the checkpoints under {self.directory} could be read '
        f'completely ({listing}). Nothing was moved or deleted. To start this '
        f'run from scratch, move {self.directory} aside (or use another '
        '--workdir); to inspect a step, see nfnets.checkpoints.restore_params.',
        str(self.directory), [s for s, _ in failures])

  def _try_restore(self, step, restore_target, expected):
    """(state, None) or (None, reason). Raises CheckpointMismatchError."""
    where = self.directory / str(step)
    try:
      saved_meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      log.debug('Reading %s/meta failed', where, exc_info=e)
      return None, _short(e)
    check_meta(saved_meta, expected, where)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(restore_target)))['state']
    except Exception as e:  # pylint: disable=broad-except
      log.debug('Restoring %s/state failed', where, exc_info=e)
      return None, _short(e)
    return restored, None

  def _move_aside(self, steps):
    """Moves unreadable step dirs to WORKDIR/checkpoints_corrupt/ (process 0)
    and makes the manager forget them (so retention counts only good ones)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
        '%Y%m%dT%H%M%SZ')
    dest_root = self.workdir / CORRUPT_DIR
    moved = [str(dest_root / f'{s}-{stamp}') for s in steps]
    if jax.process_index() == 0:
      dest_root.mkdir(parents=True, exist_ok=True)
      for s, dest in zip(steps, moved):
        shutil.move(os.fspath(self.directory / str(s)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('nfnets_move_corrupt_checkpoints')
    self.manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until queued saves are written; raises CheckpointSaveError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self.latest_step(), e) from None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def _like(target, restored: Mapping[str, Any]):
  """Returns `restored` (a mapping) as the type of `target`."""
  if hasattr(target, '_asdict'):
    return type(target)(**{k: restored[k] for k in STATE_FIELDS})
  return {k: restored[k] for k in STATE_FIELDS}


def check_meta(saved: Dict[str, Any], expected: Dict[str, Any], where) -> None:
  """Raises CheckpointMismatchError if `saved` meta is for another model."""
  problems = []
  for key in ('model', 'num_classes'):
    if key in expected and saved.get(key) != expected[key]:
      problems.append(f'{key}: checkpoint has {saved.get(key)!r}, config has '
                      f'{expected[key]!r}')
  s_sig, e_sig = saved.get('signature', {}), expected['signature']
  if s_sig.get('digest') != e_sig['digest']:
    s_leaves, e_leaves = s_sig.get('leaves', {}), e_sig['leaves']
    diff = [k for k in sorted(set(s_leaves) | set(e_leaves))
            if s_leaves.get(k) != e_leaves.get(k)]
    problems.append(f'parameter tree differs at {len(diff)} leaves, e.g. ' +
                    '; '.join(f'{k}: checkpoint {s_leaves.get(k)} vs model '
                              f'{e_leaves.get(k)}' for k in diff[:3]))
  if problems:
    raise CheckpointMismatchError(
        f'The checkpoint at {where} was written for a different model/config: '
        + ' | '.join(problems) + '. Use a fresh --workdir for this config, or '
        'the config the checkpoint was trained with.')


def _step_dir(path: epath.Path) -> epath.Path:
  """Accepts a workdir, its checkpoints/ dir or one step dir."""
  if (path / 'state').exists():
    return path
  if (path / 'checkpoints').exists():
    path = path / 'checkpoints'
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
  if not steps:
    raise FileNotFoundError(f'No checkpoint found under {path}.')
  return path / str(steps[-1])


def _host_target(metadata):
  """A restore target of host numpy placeholders for a saved tree.

  Without a target orbax restores jax.Arrays with the shardings recorded at
  save time, which fails ('Topology mismatch') wherever those devices do not
  exist: a checkpoint of a jit/FSDP run over several processes, or of a GPU
  run read on a CPU."""
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  return jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype),
                                                x.shape), tree)


def restore_params(path: str, which: str = 'ema') -> Dict[str, Any]:
  """Reads the raw ('raw') or EMA ('ema') params of one run checkpoint
  (a workdir, its checkpoints/ dir or one step dir; the newest step), as host
  numpy, without the optimizer state or knowing the model config."""
  if which not in ('ema', 'raw'):
    raise ValueError(f"which must be 'ema' or 'raw', got {which!r}.")
  step_dir = _step_dir(epath.Path(path))
  key = 'ema_params' if which == 'ema' else 'params'
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(step_dir / 'state',
                          _host_target(ckptr.metadata(step_dir / 'state')))
  return jax.tree.map(np.asarray, state[key])
