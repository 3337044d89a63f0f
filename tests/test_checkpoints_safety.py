"""The restricted unpickler: arrays and dicts load, code never runs."""
import collections
import io
import os
import pickle

import dill
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nfnets.checkpoints as C


class _Evil:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return (os.system, (self.cmd,))


def _load_file(tmp_path, data):
  p = tmp_path / 'ckpt.npz'
  p.write_bytes(data)
  return C.read_params(str(p))


def test_os_system_refused_without_running(tmp_path):
  sentinel = tmp_path / 'pwned'
  evil = {'NFNet/~/linear': {'w': np.zeros((2, 2), np.float32),
                             'b': _Evil(f'touch {sentinel}')}}
  for dump in (pickle.dumps, dill.dumps):
    with pytest.raises(C.UnsafeCheckpointError) as e:
      _load_file(tmp_path, dump(evil))
    # os.system pickles as posix.system on Linux.
    assert f"'{os.system.__module__}.system'" in str(e.value)
    assert e.value.global_name == f'{os.system.__module__}.system'
  assert not sentinel.exists()


def test_hand_written_protocol0_os_system(tmp_path):
  sentinel = tmp_path / 'pwned0'
  data = f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode()
  with pytest.raises(C.UnsafeCheckpointError, match="'os.system'"):
    _load_file(tmp_path, data)
  assert not sentinel.exists()
  # Sanity: the same bytes do run the command under plain pickle.
  pickle.loads(data)
  assert sentinel.exists()


@pytest.mark.parametrize('module,name', [
    ('builtins', 'eval'), ('builtins', 'exec'), ('subprocess', 'Popen'),
    ('dill._dill', '_load_type'), ('dill._dill', '_create_function'),
    ('numpy', 'load'), ('copyreg', '_reconstructor'), ('builtins', 'getattr'),
    ('numpy.core.multiarray', '_reconstruct.__globals__'),
])
def test_other_globals_refused(tmp_path, module, name):
  data = f'c{module}\n{name}\n(tR.'.encode()
  with pytest.raises(C.UnsafeCheckpointError, match=f"'{module}.{name}'"):
    _load_file(tmp_path, data)


def test_allowed_builder_cannot_be_abused():
  class Abuse:
    def __reduce__(self):
      return (dill._dill._create_array,  # pylint: disable=protected-access
              (collections.OrderedDict, ([],), None, None))
  with pytest.raises(C.UnsafeCheckpointError, match='_create_array'):
    C.safe_loads(pickle.dumps(Abuse()))


def test_object_arrays_refused():
  arr = np.array([1, 'x'], dtype=object)
  for dump in (pickle.dumps, dill.dumps):
    with pytest.raises(C.UnsafeCheckpointError, match='object'):
      C.safe_loads(dump({'a': {'w': arr}}))


def test_persistent_ids_refused():
  class P(pickle.Pickler):
    def persistent_id(self, obj):
      return 'x' if isinstance(obj, str) and obj == 'pid' else None
  buf = io.BytesIO()
  P(buf).dump({'a': 'pid'})
  with pytest.raises(C.UnsafeCheckpointError, match='persistent'):
    C.safe_loads(buf.getvalue())


@pytest.mark.parametrize('protocol', [0, 2, 3, 4, 5])
def test_numpy_trees_load_in_every_protocol(protocol):
  tree = {'NFNet/~/stem_conv0': {
      'w': np.arange(24, dtype=np.float32).reshape(2, 3, 4),
      'f': np.asfortranarray(np.arange(6.0).reshape(2, 3)),
      'i': np.arange(3, dtype=np.int32),
      'half': np.ones(2, np.float16),
      'bf16': np.ones(2, ml_dtypes.bfloat16),
      's': np.float32(0.5), 'z': np.zeros((), np.float32)},
          'o': collections.OrderedDict(x=np.ones(1))}
  for dump in (pickle.dumps, dill.dumps):
    got = C.safe_loads(dump(tree, protocol=protocol))
    for m in tree:
      for n, v in tree[m].items():
        assert np.asarray(got[m][n]).dtype == np.asarray(v).dtype
        assert np.array_equal(np.asarray(got[m][n]), np.asarray(v))


def test_jax_arrays_pickle_load_as_numpy():
  tree = {'NFNet/~/linear': {'w': jnp.arange(6.0).reshape(2, 3),
                             'b': jnp.zeros(3)}}
  got = C.safe_loads(dill.dumps(tree))
  assert type(got['NFNet/~/linear']['w']) is np.ndarray
  assert np.array_equal(got['NFNet/~/linear']['w'],
                        np.arange(6.0, dtype=np.float32).reshape(2, 3))


def test_haiku_mappings_become_dicts():
  import haiku as hk  # pylint: disable=g-import-not-at-top
  tree = hk.data_structures.to_immutable_dict(
      {'NFNet/~/linear': {'w': np.ones((2, 2), np.float32)}})
  got = C.safe_loads(pickle.dumps(tree))
  assert isinstance(got, dict)
  assert np.array_equal(got['NFNet/~/linear']['w'], np.ones((2, 2)))
