"""The parameter file formats: reading any of them into a Haiku params tree
(`read_params`) and writing ours (`save_npz`, `save_orbax`).

Formats read (detected from the content, not the file name):

  * DeepMind's released weights (`F0_haiku.npz` ... `F6_haiku.npz`): despite
    the extension, dill pickles of a Haiku params dict. Read with
    `safe_pickle.RestrictedUnpickler` -- no code from the file is run.
  * A plain numpy `.npz` without pickles, in this package's flat scheme
    (`save_npz`): one array per parameter under the key 'module_path:param',
    e.g. 'NFNet/~/stem_conv0:w', 'NFNet/~/nf_block_3:skip_gain', plus the
    string array '__format__' = 'nfnets.haiku_params.v1'. Keys starting with
    '__' are metadata.
  * A `.npz` in PyTorch/timm layout written by `torch_layout.save_torch_npz`
    (keys like 'stem.conv1.weight'); converted back to the Haiku tree.
  * A params-only orbax directory written by `save_orbax` /
    convert_checkpoint.py --format orbax: DIR/params (orbax
    StandardCheckpointer) + DIR/nfnets_checkpoint.json.
  * Our own training checkpoints (a workdir, its checkpoints/ dir or one step
    dir), via `nfnets.checkpoints.run.restore_params(path, which)`.
  * timm's Hugging Face `model.safetensors` (dm_nfnet_f*, eca_nfnet_l*,
    nfnet_l0, nf_resnet50), converted by `nfnets.checkpoints.timm` (variant
    inferred).

Nothing here checks a tree against a model: that is
`nfnets.checkpoints.pretrained` (`load_pretrained`, `validate_params`).
"""
import os
import pickle
import zipfile
from typing import Any, Dict, Mapping

import numpy as np

from nfnets.checkpoints import safe_pickle
from nfnets.checkpoints import timm as timm_weights
from nfnets.checkpoints.errors import (CheckpointError,
                                       TruncatedCheckpointError,
                                       UnsafeCheckpointError)

Params = Dict[str, Dict[str, np.ndarray]]

NPZ_FORMAT = 'nfnets.haiku_params.v1'
ORBAX_FORMAT = 'nfnets.haiku_params.orbax.v1'
SEP = ':'  # between module path and param name in flat keys
_ORBAX_META = 'nfnets_checkpoint.json'
_ZIP_MAGIC = b'PK\x03\x04'
_EMPTY_ZIP_MAGIC = b'PK\x05\x06'


# ----------------------------------------------------------------------------
# Flat keys and trees.


def flatten(params: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """{'module': {'param': x}} -> {'module:param': x}."""
  return {f'{m}{SEP}{n}': v for m, d in params.items() for n, v in d.items()}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
  """{'module:param': x} -> {'module': {'param': x}}."""
  out: Dict[str, Dict[str, Any]] = {}
  for key, value in flat.items():
    if SEP not in key:
      raise CheckpointError(
          f"key {key!r} is not of the form 'module/path{SEP}param'.")
    module, name = key.rsplit(SEP, 1)
    out.setdefault(module, {})[name] = value
  return out


def _to_numpy_tree(obj: Any, source: str) -> Params:
  """Checks a two-level mapping of arrays and returns plain dicts of numpy."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(
        f'{source} is not a Haiku params dict: it holds a '
        f'{type(obj).__name__}.')
  out: Params = {}
  for module, sub in obj.items():
    if not isinstance(module, str) or not isinstance(sub, Mapping):
      raise CheckpointError(
          f'{source} is not a Haiku params dict {{module_path: {{name: '
          f'array}}}}: entry {module!r} holds a {type(sub).__name__}.')
    out[module] = {}
    for name, value in sub.items():
      if isinstance(value, Mapping) or not hasattr(value, 'shape'):
        raise CheckpointError(
            f'{source}: {module}{SEP}{name} is a {type(value).__name__}, '
            'not an array.')
      out[module][str(name)] = np.asarray(value)
  return out


def _unwrap(obj: Any, which: str) -> Any:
  """Accepts {'params': tree, 'ema_params': tree, ...} wrappers too."""
  if not isinstance(obj, Mapping) or any('/' in str(k) for k in obj):
    return obj
  keys = {'ema': ('ema_params', 'params_ema', 'ema'),
          'raw': ('params', 'raw_params', 'raw')}[which]
  for key in keys:
    if key in obj and isinstance(obj[key], Mapping):
      return obj[key]
  if len(obj) == 1 and isinstance(next(iter(obj.values())), Mapping):
    inner = next(iter(obj.values()))
    if any('/' in str(k) for k in inner):
      return inner
  return obj


# ----------------------------------------------------------------------------
# File formats.


def save_npz(params: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Writes params as a plain .npz (no pickles) in the flat key scheme."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  for key, value in flat.items():
    if value.dtype.hasobject:
      raise CheckpointError(f'{key} has dtype object; cannot save.')
  flat['__format__'] = np.array(NPZ_FORMAT)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    np.savez(f, **flat)
  os.replace(tmp, path)
  return path


def _read_npz(path: str) -> Params:
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except zipfile.BadZipFile as e:
    raise TruncatedCheckpointError(
        f'{path} is truncated or corrupt: it starts like a zip/.npz archive '
        f'but cannot be read ({e}).') from e
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise UnsafeCheckpointError(
          f'{path} is an .npz that contains pickled object arrays; refusing '
          'to load them.') from e
    raise TruncatedCheckpointError(
        f'{path} is truncated or corrupt ({e}).') from e
  except (EOFError, OSError) as e:
    raise TruncatedCheckpointError(
        f'{path} is truncated or corrupt ({type(e).__name__}: {e}).') from e
  meta = {k: v for k, v in flat.items() if k.startswith('__')}
  flat = {k: v for k, v in flat.items() if not k.startswith('__')}
  if not flat:
    raise CheckpointError(f'{path} is an .npz without any parameter arrays.')
  if all(SEP in k for k in flat):
    return unflatten(flat)
  from nfnets.checkpoints import torch_layout  # pylint: disable=g-import-not-at-top
  if torch_layout.looks_like_torch_layout(flat):
    return torch_layout.from_torch_layout(flat)
  bad = sorted(k for k in flat if SEP not in k)[:5]
  raise CheckpointError(
      f'{path} is an .npz but not an NFNet checkpoint: keys such as {bad} are '
      f"neither 'module/path{SEP}param' (format {NPZ_FORMAT}) nor timm "
      f'dm_nfnet names. Metadata: {sorted(meta)}.')


def save_orbax(params: Mapping[str, Mapping[str, Any]], directory: str,
               **metadata) -> str:
  """Writes a params-only orbax checkpoint: DIR/params (orbax
  StandardCheckpointer) and DIR/nfnets_checkpoint.json (format + metadata)."""
  import json  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.fspath(directory))
  tree = {m: {n: np.asarray(v) for n, v in d.items()}
          for m, d in params.items()}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, 'params'), tree)
  with open(os.path.join(directory, _ORBAX_META), 'w') as f:
    json.dump(dict(format=ORBAX_FORMAT, **metadata), f, indent=1)
  return directory


def _read_orbax_params(directory: str) -> Params:
  import json  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, _ORBAX_META)) as f:
    meta = json.load(f)
  if meta.get('format') != ORBAX_FORMAT:
    raise CheckpointError(f'{directory}: unknown format {meta.get("format")!r}'
                          f' in {_ORBAX_META}.')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(os.path.join(os.path.abspath(directory), 'params'))
  except Exception as e:  # pylint: disable=broad-except
    raise TruncatedCheckpointError(
        f'{directory}: the orbax params could not be restored (truncated or '
        f'corrupt?): {type(e).__name__}: {e}') from e
  return _to_numpy_tree(tree, directory)


def _read_pickle(path: str) -> Any:
  try:
    with open(path, 'rb') as f:
      return safe_pickle.safe_load(f)
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f'{path}: {e}', e.global_name) from None
  except (EOFError, pickle.UnpicklingError, MemoryError, IndexError,
          KeyError, TypeError, ValueError, AttributeError,
          UnicodeDecodeError, OverflowError) as e:
    raise TruncatedCheckpointError(
        f'{path} is truncated or is not a released NFNet checkpoint (a '
        f'pickled Haiku params dict): reading it failed with '
        f'{type(e).__name__}: {e}') from e


def read_params(path: str, which: str = 'ema') -> Params:
  """Reads any supported format into {module: {param: np.ndarray}}.

  Args:
    path: a released pickle, a flat or torch-layout .npz, or an orbax
      checkpoint directory of ours.
    which: for checkpoints holding both, 'ema' or 'raw' params.
  Returns:
    The params tree (not validated; see `load_pretrained`).
  """
  if which not in ('ema', 'raw'):
    raise ValueError(f"which must be 'ema' or 'raw', got {which!r}.")
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, _ORBAX_META)):
    return _read_orbax_params(path)
  if os.path.isdir(path):
    from nfnets.checkpoints import run  # pylint: disable=g-import-not-at-top
    try:
      tree = run.restore_params(path, which)
    except FileNotFoundError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'{path}: not a readable training checkpoint of ours (workdir, '
          f'checkpoints/ dir or step dir): {type(e).__name__}: {e}') from e
    return _to_numpy_tree(_unwrap(tree, which), path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path}.')
  if timm_weights.is_safetensors(path):
    return timm_weights.read_timm(path)[0]
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    raise TruncatedCheckpointError(
        f'{path} is empty: truncated, or not a released checkpoint.')
  if head in (_ZIP_MAGIC, _EMPTY_ZIP_MAGIC):
    if _is_torch_zip(path):
      raise CheckpointError(
          f'{path} is a PyTorch (torch.save) file; this package reads the '
          'torch layout only as .npz (torch_layout.save_torch_npz).')
    return _read_npz(path)
  if head[:1] != b'\x80' and head[:1] not in b'(}]cN':
    raise TruncatedCheckpointError(
        f'{path} is not a released NFNet checkpoint: it is neither a pickle '
        f'nor an .npz archive (starts with {head!r}).')
  return _to_numpy_tree(_unwrap(_read_pickle(path), which), path)


def _is_torch_zip(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith('/data.pkl') for n in z.namelist())
  except (zipfile.BadZipFile, OSError):
    return False
