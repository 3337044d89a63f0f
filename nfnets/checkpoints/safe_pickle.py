"""A pickle reader that only rebuilds dicts, numpy arrays and dtypes.

DeepMind's released NFNet weights (`F0_haiku.npz` ...) are dill pickles of a
Haiku params dict, and `pickle.load`/`dill.load` on a downloaded file runs
whatever callable the file names. This reader resolves every global the
stream references through an allow-list. Each allowed name maps to one of our
own small functions (never to the library function the name points at when
that function could call something else), so the only code a pickle can run is:

  * build an ndarray (numpy's `_reconstruct` / `_frombuffer`, dill's
    `_create_array`, jax's array reconstructors -- all rebuilt here and
    returning plain numpy arrays, refusing object dtypes);
  * build a dtype (`numpy.dtype`, object dtypes refused) or a numpy scalar;
  * build a mapping (`collections.OrderedDict`, Haiku's `FlatMapping` and
    `frozendict` -> plain dict);
  * `_codecs.encode(text, 'latin1')`, which protocol-2 pickles use for bytes.

Any other global raises `UnsafeCheckpointError` naming 'module.name' before
anything is imported or called. Persistent ids and out-of-band buffers are
refused too.
"""
import collections
import io
import pickle
from typing import Any, BinaryIO, Dict, List

import numpy as np

from nfnets.checkpoints.errors import UnsafeCheckpointError

_np_core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
_reconstruct = _np_core.multiarray._reconstruct
_scalar = _np_core.multiarray.scalar


class _NDArrayType:
  """Stands in for `numpy.ndarray` inside the stream (not callable)."""

  def __repr__(self):
    return '<numpy.ndarray (safe placeholder)>'


_NDARRAY = _NDArrayType()


def _refuse(what: str):
  raise UnsafeCheckpointError(
      f'refusing to load: {what}. Only dicts, numpy arrays and dtypes can be '
      'read from a pickled checkpoint.')


def _check_dtype(dtype) -> np.dtype:
  if not isinstance(dtype, np.dtype):
    _refuse(f'expected a numpy dtype, got {type(dtype).__name__}')
  if dtype.hasobject:
    _refuse(f'arrays of Python objects (dtype {dtype}) are not allowed')
  return dtype


def _safe_dtype(obj, align=False, copy=False):
  if not (isinstance(obj, str) or
          (isinstance(obj, type) and issubclass(obj, np.generic))):
    _refuse(f'numpy.dtype called with a {type(obj).__name__}')
  return _check_dtype(np.dtype(obj, align=bool(align), copy=bool(copy)))


def _safe_reconstruct(subtype, shape, dtype_code):
  if subtype is not _NDARRAY:
    _refuse(f'numpy _reconstruct of {subtype!r} (only numpy.ndarray allowed)')
  return _reconstruct(np.ndarray, shape, dtype_code)


def _set_state(array, state):
  if not isinstance(array, np.ndarray) or type(array) is not np.ndarray:
    _refuse(f'array state applied to a {type(array).__name__}')
  if not isinstance(state, tuple) or not any(
      isinstance(s, np.dtype) for s in state):
    _refuse('malformed ndarray state')
  for s in state:
    if isinstance(s, np.dtype):
      _check_dtype(s)
  array.__setstate__(state)
  _check_dtype(array.dtype)
  return array


def _safe_create_array(f, args, state, npdict=None):
  """dill._dill._create_array: f(*args).__setstate__(state)."""
  if f is not _safe_reconstruct:
    _refuse(f'dill _create_array with constructor {f!r}')
  if npdict:
    _refuse('dill _create_array with an instance __dict__ (ndarray subclass)')
  return _set_state(f(*args), state)


def _safe_reconstruct_jax(fun, args, arr_state, aval_state=None):
  """jax's `_reconstruct_array` / `reconstruct_device_array`, as numpy."""
  if aval_state is not None and not isinstance(aval_state, dict):
    _refuse('malformed jax array state')
  return _safe_create_array(fun, args, arr_state)


def _safe_frombuffer(buf, dtype, shape, order, axis_order=None):
  """numpy's protocol-5 `_frombuffer`, with the buffer copied."""
  if not isinstance(buf, (bytes, bytearray)):
    _refuse(f'numpy _frombuffer of a {type(buf).__name__}')
  _check_dtype(dtype)
  if order not in ('C', 'F', 'K', 'A'):
    _refuse(f'numpy _frombuffer with order {order!r}')
  array = np.frombuffer(bytearray(buf), dtype=dtype)
  if order == 'K' and axis_order is not None:
    return array.reshape(shape, order='C').transpose(axis_order)
  return array.reshape(shape, order='F' if order == 'F' else 'C')


def _safe_scalar(dtype, data=None):
  _check_dtype(dtype)
  if data is not None and not isinstance(data, bytes):
    _refuse(f'numpy scalar built from a {type(data).__name__}')
  return _scalar(dtype, data) if data is not None else _scalar(dtype)


def _safe_mapping(data=None):
  """Haiku's FlatMapping/frozendict -> plain dict."""
  if data is None:
    return {}
  if not isinstance(data, dict):
    _refuse(f'mapping built from a {type(data).__name__}')
  return dict(data)


def _safe_ordered_dict(*args):
  if args and not (len(args) == 1 and isinstance(args[0], (list, dict))):
    _refuse('OrderedDict built from unexpected arguments')
  return collections.OrderedDict(*args)


def _safe_encode(text, encoding='utf-8', errors='strict'):
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    _refuse(f'_codecs.encode({type(text).__name__}, {encoding!r})')
  return text.encode('latin1')


def _allowed() -> Dict[str, Any]:
  table = {
      'numpy.ndarray': _NDARRAY,
      'numpy.dtype': _safe_dtype,
      'dill._dill._create_array': _safe_create_array,
      'dill.dill._create_array': _safe_create_array,
      'jax._src.array._reconstruct_array': _safe_reconstruct_jax,
      'jax._src.device_array.reconstruct_device_array': _safe_reconstruct_jax,
      'collections.OrderedDict': _safe_ordered_dict,
      'haiku._src.data_structures.FlatMapping': _safe_mapping,
      'haiku._src.data_structures.FlatMap': _safe_mapping,
      'haiku._src.data_structures.frozendict': _safe_mapping,
      '_codecs.encode': _safe_encode,
  }
  for core in ('numpy.core', 'numpy._core'):
    table[f'{core}.multiarray._reconstruct'] = _safe_reconstruct
    table[f'{core}.multiarray.scalar'] = _safe_scalar
    table[f'{core}.numeric._frombuffer'] = _safe_frombuffer
  # Extension dtypes that jax params may carry (bfloat16 etc.): the types
  # themselves, looked up only if ml_dtypes is installed.
  try:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    for name in ('bfloat16', 'float8_e4m3fn', 'float8_e5m2', 'int4', 'uint4'):
      if hasattr(ml_dtypes, name):
        table[f'ml_dtypes.{name}'] = getattr(ml_dtypes, name)
  except ImportError:
    pass
  return table


ALLOWED_GLOBALS = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler whose `find_class` only returns allow-listed builders."""

  def find_class(self, module: str, name: str):
    key = f'{module}.{name}'
    if key in ALLOWED_GLOBALS:
      return ALLOWED_GLOBALS[key]
    raise UnsafeCheckpointError(
        f"refusing to load: the pickle references the global '{key}', which "
        'is not allowed (only dicts, numpy arrays and dtypes can be rebuilt; '
        'nothing was executed). If this file is a checkpoint you trust, '
        'convert it in a trusted environment to .npz with '
        'scripts/convert_checkpoint.py.', global_name=key)

  def persistent_load(self, pid):
    _refuse(f'persistent id {pid!r}')


def safe_load(file: BinaryIO) -> Any:
  """Reads one pickle from a binary file object with `RestrictedUnpickler`."""
  return RestrictedUnpickler(file).load()


def safe_loads(data: bytes) -> Any:
  return safe_load(io.BytesIO(data))


def allowed_globals() -> List[str]:
  """Names the safe loader accepts (for docs and error messages)."""
  return sorted(ALLOWED_GLOBALS)
