"""Run checkpoints (nfnets.checkpoints.run): layout-independent save/restore,
fallback past corrupt checkpoints, model mismatch, clear errors."""
import glob
import logging
import os

import jax
import numpy as np
import pytest

from nfnets import checkpoints as C
from nfnets.checkpoints import run
from nfnets.training.state import TrainState

META = {'model': 'toy', 'num_classes': 3}


def _state(k: int):
  rng = np.random.RandomState(k)
  return TrainState(
      params={'lin': {'w': rng.rand(64, 64).astype(np.float32),
                      'b': rng.rand(88).astype(np.float32)}},
      opt_state=({'m': rng.rand(64, 64).astype(np.float32)}, ()),
      ema_params={'lin': {'w': rng.rand(64, 64).astype(np.float32),
                          'b': rng.rand(88).astype(np.float32)}},
      step=np.int32(k), nonfinite=np.int32(0))


def _equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _sharding(spec):
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('a', 'b'))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def _place(state, rows):
  """2-D leaves sharded with `rows`, the rest replicated."""
  repl = _sharding(())
  return jax.tree.map(
      lambda x: jax.device_put(x, rows if np.ndim(x) == 2 else repl), state)


def test_saved_as_mapping_and_restored_into_any_layout(tmp_path):
  src = _state(5)
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)
  placed = _place(src, _sharding(('a', 'b')))
  compiles = []

  def listener(event, *unused_args, **unused_kwargs):
    if event == '/jax/core/compile/jaxpr_to_mlir_module_duration':
      compiles.append(event)  # a compilation, or a persistent-cache hit
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # Sharded jax.Array leaves are saved as they are (no gather); the
    # replicated ones (b: a shape no other test uses) once, without
    # splitting them (a compiled slice per device and shape).
    ckpt.save(5, placed, META)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, compiles
  ckpt.close()
  saved = C.restore_params(str(tmp_path), 'raw')
  _equal(saved, src.params)
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)
  host = ckpt.restore(_state(0), META)  # numpy target -> numpy
  assert isinstance(host, TrainState)
  assert isinstance(host.params['lin']['w'], np.ndarray)
  _equal(host, src)
  # jax.Array target with another sharding -> that sharding.
  cols = _sharding((None, 'a'))
  out = ckpt.restore(_place(_state(0), cols), META)
  assert out.params['lin']['w'].sharding == cols
  _equal(out, src)
  # ShapeDtypeStructs (with and without sharding) in a plain mapping.
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                     sharding=cols if np.ndim(x) == 2 else
                                     None), _state(0)._asdict())
  out = ckpt.restore(target, META)
  assert isinstance(out, dict) and set(out) == set(run.STATE_FIELDS)
  assert out['ema_params']['lin']['w'].sharding == cols
  assert isinstance(out['step'], np.ndarray)
  _equal(out, src._asdict())
  ckpt.close()


def _data_files(workdir, step):
  return glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state',
                                'ocdbt.process_*', 'd', '*'))


def _truncate_largest(workdir, step):
  path = max(_data_files(workdir, step), key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def test_corrupt_latest_falls_back_moves_aside_and_keeps_good(tmp_path,
                                                              caplog):
  workdir = str(tmp_path)
  ckpt = C.RunCheckpointer(workdir, max_to_keep=3, async_save=True)
  for k in (1, 2, 3):
    ckpt.save(k, _state(k), META)
  ckpt.close()
  _truncate_largest(workdir, 3)
  ckpt = C.RunCheckpointer(workdir, max_to_keep=3, async_save=True)
  with caplog.at_level(logging.WARNING):
    out = ckpt.restore(_state(0), META)
  _equal(out, _state(2))
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
              and r.name.startswith('nfnets')]
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  msg = warnings[0].getMessage()
  assert 'resuming from step 2' in msg and 'checkpoints_corrupt' in msg
  moved = os.listdir(tmp_path / 'checkpoints_corrupt')
  assert len(moved) == 1 and moved[0].startswith('3-')
  assert _data_files(str(tmp_path / 'checkpoints_corrupt'), '') == [] and \
      glob.glob(str(tmp_path / 'checkpoints_corrupt' / moved[0] / 'state'))
  assert ckpt.all_steps() == [1, 2]
  # Retention counts only good checkpoints: step 2 survives two new saves.
  ckpt.save(3, _state(3), META)
  ckpt.save(4, _state(4), META)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3, 4]
  _equal(ckpt.restore(_state(0), META), _state(4))
  ckpt.close()
  assert os.listdir(tmp_path / 'checkpoints_corrupt') == moved


def test_model_mismatch_is_not_corruption(tmp_path):
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(1), META)
  ckpt.save(2, _state(2), META)
  other = _state(0)._replace(params={'lin': {'w': np.zeros((64, 4),
                                                           np.float32),
                                             'b': np.zeros(4, np.float32)}})
  with pytest.raises(C.CheckpointMismatchError,
                     match=r"lin.*\[64, 64\].*vs model.*\[64, 4\]"):
    ckpt.restore(other, META)
  with pytest.raises(C.CheckpointMismatchError, match='model:.*toy.*F0'):
    ckpt.restore(_state(0), dict(META, model='F0'))
  assert ckpt.all_steps() == [1, 2]
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  ckpt.close()


def test_none_readable_is_one_clear_error_and_moves_nothing(tmp_path):
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(1), META)
  ckpt.save(2, _state(2), META)
  ckpt.close()
  for step in (1, 2):
    _truncate_largest(str(tmp_path), step)
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)
  with pytest.raises(C.CorruptCheckpointError) as info:
    ckpt.restore(_state(0), META)
  msg = str(info.value)
  assert str(tmp_path / 'checkpoints') in msg
  assert 'step 2: ' in msg and 'step 1: ' in msg and 'move' in msg
  assert len(msg) < 2000
  assert info.value.steps == [2, 1]
  assert ckpt.all_steps() == [1, 2]
  assert not (tmp_path / 'checkpoints_corrupt').exists()
  ckpt.close()


def test_failed_save_is_one_clear_error(tmp_path, monkeypatch):
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)

  def fail(*args, **kwargs):
    raise OSError('[Errno 28] No space left on device\n' + 'x\n' * 1000)
  monkeypatch.setattr(ckpt.manager, 'save', fail)
  with pytest.raises(C.CheckpointSaveError) as info:
    ckpt.save(3, _state(3), META)
  msg = str(info.value)
  assert 'step 3' in msg and str(tmp_path / 'checkpoints') in msg
  assert 'No space left' in msg and 'disk space' in msg
  assert info.value.__cause__ is None and len(msg.splitlines()) == 1
  monkeypatch.undo()
  ckpt.close()


def test_state_must_have_the_five_fields(tmp_path):
  ckpt = C.RunCheckpointer(str(tmp_path), async_save=False)
  with pytest.raises(TypeError, match='nonfinite'):
    ckpt.save(1, {'params': {}, 'opt_state': (), 'ema_params': {},
                  'step': 0}, META)
  ckpt.close()
