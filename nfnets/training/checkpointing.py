"""Checkpoints with orbax: async, atomic, keep-last-N, validated on restore.

Layout: WORKDIR/checkpoints/<step>/{state,meta}. orbax writes each step into
a temporary directory and renames it when complete, so a crash or `kill -9`
mid-save leaves the previous checkpoints intact (an unfinished temporary
directory is ignored and cleaned up). 'meta' records what the state belongs
to (model, classes, parameter shapes); a restore into a different model
fails with a message naming the difference instead of an orbax shape error.
"""
import hashlib
import json
from typing import Any, Dict, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointMismatchError(ValueError):
  """A checkpoint does not belong to the configured model/run."""


def tree_signature(params) -> Dict[str, Any]:
  """Paths, shapes and dtypes of a param tree, with a short digest."""
  flat = {jax.tree_util.keystr(p): [list(np.shape(v)), str(np.asarray(v).dtype)
                                    if not hasattr(v, 'dtype') else str(v.dtype)]
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
  return {'num_params': int(sum(np.prod(s) for s, _ in flat.values())),
          'digest': digest[:16], 'leaves': flat}


def _as_host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


class Checkpointer:
  """Saves/restores the TrainState under WORKDIR/checkpoints.

  Args:
    workdir: run directory.
    max_to_keep: number of most recent checkpoints kept.
    async_save: write in a background thread (the step loop continues).
  """

  def __init__(self, workdir: str, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: Dict[str, Any]) -> None:
    """Saves a host (unreplicated) state; returns once the save is queued."""
    meta = dict(meta, signature=tree_signature(state.params), step=int(step))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_as_host(state)),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, target_state, meta: Dict[str, Any],
              step: Optional[int] = None):
    """Restores into the structure of `target_state` (host arrays).

    Raises CheckpointMismatchError if the checkpoint was written for another
    model (different model name, classes or parameter shapes).
    """
    step = self.latest_step() if step is None else step
    saved_meta = self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))['meta']
    expected = dict(meta, signature=tree_signature(target_state.params))
    _check_meta(saved_meta, expected, self.directory / str(step))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_as_host(target_state))))['state']
    return type(target_state)(*restored) if isinstance(
        restored, (list, tuple)) else restored

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_meta(saved: Dict[str, Any], expected: Dict[str, Any], where) -> None:
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


def restore_params(path: str, which: str = 'ema') -> Dict[str, Any]:
  """Reads the raw ('raw') or EMA ('ema') params of one of our checkpoints,
  without the optimizer state or knowing the model config."""
  if which not in ('ema', 'raw'):
    raise ValueError(f"which must be 'ema' or 'raw', got {which!r}.")
  step_dir = _step_dir(epath.Path(path))
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(step_dir / 'state')
  key = 'ema_params' if which == 'ema' else 'params'
  if isinstance(state, (list, tuple)):  # saved as a namedtuple -> sequence
    state = dict(zip(('params', 'opt_state', 'ema_params', 'step',
                      'nonfinite'), state))
  return jax.tree.map(np.asarray, state[key])
