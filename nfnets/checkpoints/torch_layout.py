"""NFNet (F-series) params <-> PyTorch layout with timm's `dm_nfnet_*` names.

Naming (checked against timm/models/nfnet.py: `create_stem` with
stem_type='deep_quad', `NormFreeBlock`, `DownsampleAvg`, `SEModule`,
`ClassifierHead`; convs are `ScaledStdConv2dSame`):

  Haiku (DeepMind release)                      timm dm_nfnet_*
  NFNet/~/stem_conv{i}            i = 0..3       stem.conv{i+1}
  NFNet/~/nf_block[_k]            skip_gain      stages.{s}.{b}.skipinit_gain
    /~/conv0                                     stages.{s}.{b}.conv1
    /~/conv1        (grouped 3x3, strided)       stages.{s}.{b}.conv2
    /~/conv1b       (grouped 3x3)                stages.{s}.{b}.conv2b
    /~/conv2                                     stages.{s}.{b}.conv3
    /~/conv_shortcut                             stages.{s}.{b}.downsample.conv
    /~/squeeze_excite/~/linear                   stages.{s}.{b}.attn_last.fc1
    /~/squeeze_excite/~/linear_1                 stages.{s}.{b}.attn_last.fc2
  NFNet/~/final_conv                             final_conv
  NFNet/~/linear                                 head.fc

Block k (0-based over the net) is block b of stage s in order; stages are
found from the blocks that carry a conv_shortcut (every first block).

Tensors: conv 'w' HWIO [kh,kw,in/g,out] -> 'weight' OIHW [out,in/g,kh,kw];
'gain' [out] -> 'gain' [out,1,1,1]; 'bias' [out] -> 'bias' [out].
SE linears (1x1 convs in timm): 'w' [in,out] -> 'weight' [out,in,1,1],
'b' -> 'bias'. Classifier (nn.Linear): 'w' [in,out] -> 'weight' [out,in],
'b' -> 'bias'. skip_gain () -> skipinit_gain ().

This is a layout conversion only: it is exact (transposes/reshapes) and
round-trips bit for bit. timm's ScaledStdConv2dSame standardises with a
slightly different epsilon than the Haiku WSConv2D, so outputs of the two
frameworks agree only to float tolerance.
"""
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from nfnets.checkpoints.errors import CheckpointError

_CONV = {'conv0': 'conv1', 'conv1': 'conv2', 'conv1b': 'conv2b',
         'conv2': 'conv3', 'conv_shortcut': 'downsample.conv'}
_SE = {'squeeze_excite/~/linear': 'attn_last.fc1',
       'squeeze_excite/~/linear_1': 'attn_last.fc2'}
_BLOCK_RE = re.compile(r'^NFNet/~/nf_block(?:_(\d+))?(?:/~/(.+))?$')
_TIMM_BLOCK_RE = re.compile(r'^stages\.(\d+)\.(\d+)\.(.+)$')


def _conv_to_torch(prefix: str, p: Mapping[str, Any], out: Dict[str, Any]):
  w = np.asarray(p['w'])
  if w.ndim != 4:
    raise CheckpointError(f'{prefix}: conv weight must be 4-D HWIO, got '
                          f'shape {w.shape}.')
  out[f'{prefix}.weight'] = np.ascontiguousarray(w.transpose(3, 2, 0, 1))
  out[f'{prefix}.gain'] = np.asarray(p['gain']).reshape(-1, 1, 1, 1)
  out[f'{prefix}.bias'] = np.asarray(p['bias'])
  extra = set(p) - {'w', 'gain', 'bias'}
  if extra:
    raise CheckpointError(f'{prefix}: unexpected conv params {sorted(extra)}.')


def _conv_from_torch(prefix: str, sd: Mapping[str, Any]) -> Dict[str, Any]:
  w = np.asarray(sd[f'{prefix}.weight'])
  return {'w': np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
          'gain': np.asarray(sd[f'{prefix}.gain']).reshape(-1),
          'bias': np.asarray(sd[f'{prefix}.bias'])}


def _block_stages(params: Mapping[str, Any]) -> Dict[int, Tuple[int, int]]:
  """Global block index -> (stage, index in stage)."""
  idx = sorted({int(m.group(1) or 0) for m in map(_BLOCK_RE.match, params)
                if m})
  if idx != list(range(len(idx))):
    raise CheckpointError(f'NFNet blocks are not numbered 0..n-1: {idx}.')
  out, stage, b = {}, -1, 0
  for k in idx:
    name = 'NFNet/~/nf_block' + (f'_{k}' if k else '')
    if f'{name}/~/conv_shortcut' in params or stage < 0:
      stage, b = stage + 1, 0
    out[k] = (stage, b)
    b += 1
  return out


def to_torch_layout(params: Mapping[str, Mapping[str, Any]]
                    ) -> Dict[str, np.ndarray]:
  """Haiku NFNet params -> {timm dm_nfnet name: numpy array (torch layout)}."""
  stages = _block_stages(params)
  out: Dict[str, np.ndarray] = {}
  for module, p in params.items():
    m = re.match(r'^NFNet/~/stem_conv(\d)$', module)
    if m:
      _conv_to_torch(f'stem.conv{int(m.group(1)) + 1}', p, out)
      continue
    if module == 'NFNet/~/final_conv':
      _conv_to_torch('final_conv', p, out)
      continue
    if module == 'NFNet/~/linear':
      out['head.fc.weight'] = np.ascontiguousarray(np.asarray(p['w']).T)
      out['head.fc.bias'] = np.asarray(p['b'])
      continue
    m = _BLOCK_RE.match(module)
    if not m:
      raise CheckpointError(f'{module}: not part of an NFNet F-series tree; '
                            'no timm name for it.')
    s, b = stages[int(m.group(1) or 0)]
    prefix, sub = f'stages.{s}.{b}', m.group(2)
    if sub is None:
      if set(p) != {'skip_gain'}:
        raise CheckpointError(f'{module}: unexpected params {sorted(p)}.')
      out[f'{prefix}.skipinit_gain'] = np.asarray(p['skip_gain'])
    elif sub in _CONV:
      _conv_to_torch(f'{prefix}.{_CONV[sub]}', p, out)
    elif sub in _SE:
      w = np.asarray(p['w'])
      out[f'{prefix}.{_SE[sub]}.weight'] = np.ascontiguousarray(
          w.T.reshape(w.shape[1], w.shape[0], 1, 1))
      out[f'{prefix}.{_SE[sub]}.bias'] = np.asarray(p['b'])
    else:
      raise CheckpointError(f'{module}: no timm name for this block module.')
  return out


def looks_like_torch_layout(flat: Mapping[str, Any]) -> bool:
  return 'stem.conv1.weight' in flat and 'head.fc.weight' in flat


def from_torch_layout(state: Mapping[str, Any]
                      ) -> Dict[str, Dict[str, np.ndarray]]:
  """{timm dm_nfnet name: array} -> Haiku NFNet params (inverse of above).

  Accepts numpy arrays or torch tensors (converted with .numpy()).
  """
  sd = {k: _np(v) for k, v in state.items()}
  used = set()
  get = lambda k: (used.add(k), sd[k])[1]
  params: Dict[str, Dict[str, np.ndarray]] = {}
  try:
    for i in range(4):
      params[f'NFNet/~/stem_conv{i}'] = _conv_from_torch(f'stem.conv{i + 1}',
                                                         sd)
      used.update(f'stem.conv{i + 1}.{n}' for n in ('weight', 'gain', 'bias'))
    blocks = sorted({(int(m.group(1)), int(m.group(2)))
                     for m in map(_TIMM_BLOCK_RE.match, sd) if m})
    for k, (s, b) in enumerate(blocks):
      name = 'NFNet/~/nf_block' + (f'_{k}' if k else '')
      prefix = f'stages.{s}.{b}'
      params[name] = {'skip_gain': get(f'{prefix}.skipinit_gain')}
      for hk_name, t_name in _CONV.items():
        if f'{prefix}.{t_name}.weight' in sd:
          params[f'{name}/~/{hk_name}'] = _conv_from_torch(
              f'{prefix}.{t_name}', sd)
          used.update(f'{prefix}.{t_name}.{n}'
                      for n in ('weight', 'gain', 'bias'))
      for hk_name, t_name in _SE.items():
        w = get(f'{prefix}.{t_name}.weight')
        params[f'{name}/~/{hk_name}'] = {
            'w': np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T),
            'b': get(f'{prefix}.{t_name}.bias')}
    params['NFNet/~/final_conv'] = _conv_from_torch('final_conv', sd)
    used.update(f'final_conv.{n}' for n in ('weight', 'gain', 'bias'))
    params['NFNet/~/linear'] = {
        'w': np.ascontiguousarray(get('head.fc.weight').T),
        'b': get('head.fc.bias')}
  except KeyError as e:
    raise CheckpointError(f'torch-layout state dict lacks {e}.') from None
  left = sorted(set(sd) - used)
  if left:
    raise CheckpointError(f'torch-layout state dict has keys without a '
                          f'Haiku counterpart: {left[:10]}.')
  return params


def _np(v: Any) -> np.ndarray:
  if hasattr(v, 'detach'):  # a torch tensor
    v = v.detach().cpu().numpy()
  return np.asarray(v)


def save_torch_npz(params: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Writes the torch-layout tensors as a plain .npz (no torch needed)."""
  with open(path, 'wb') as f:
    np.savez(f, **to_torch_layout(params))
  return path


def load_torch_npz(path: str) -> Dict[str, Dict[str, np.ndarray]]:
  with np.load(path, allow_pickle=False) as data:
    return from_torch_layout({k: data[k] for k in data.files})


def save_torch_pt(params: Mapping[str, Mapping[str, Any]], path: str) -> str:
  """Writes a torch state dict (.pt) loadable by timm's dm_nfnet_*.

  Needs torch; raises ImportError with a hint when it is not installed.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Writing .pt needs PyTorch (pip install torch); the '
                      '.npz export (save_torch_npz) does not.') from e
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           to_torch_layout(params).items()}
  torch.save(state, path)
  return path
