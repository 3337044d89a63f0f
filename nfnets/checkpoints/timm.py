"""timm / Hugging Face hub NFNet-family weights (`model.safetensors`).

Reads a timm state dict with the `safetensors` package's NumPy API (no
torch), recognises the architecture from its keys and shapes, and converts
it to our Haiku tree:

  timm model (hub repo timm/<name>.<tag>)   our variant   conversion
  dm_nfnet_f0 .. dm_nfnet_f6                'F0'..'F6'    torch_layout
  eca_nfnet_l0/l1/l2, nfnet_l0              same names    below ('NFNet_L')
  nf_resnet50                               timm_nf_resnet50  below

timm names and layouts (timm/models/nfnet.py): convs 'weight' OIHW [out,
in/groups, kh, kw], 'gain' [out, 1, 1, 1], 'bias' [out]; 'stem.conv1'..'4';
block b of stage s is 'stages.{s}.{b}.' + conv1 (1x1), conv2 (grouped 3x3,
strided), conv2b, conv3 (1x1), downsample.conv, attn_last.conv.weight (ECA,
[1, 1, k]) or attn_last.fc1/fc2 (SE, 1x1 convs [out, in, 1, 1] + bias),
skipinit_gain (dm_ models only); 'final_conv'; 'head.fc' (nn.Linear, [out,
in]). Our block k is the k-th (stage, block) pair in order.

timm's nf_resnet50 is not the paper's NF-ResNet (its shortcut is a 2x2
average pool + 1x1 conv where the paper's is a strided 1x1 conv, and it has
timm's numerics), so it loads into its own variant 'timm_nf_resnet50'
(nfnets/models/nf_resnet_timm.py; stem 'stem.conv' -> initial_conv, blocks
-> 'NF_ResNet_T/~/nf_res_block[_k]' conv0/conv1/conv2/conv_shortcut).

Not supported: timm's nf_regnet_b1 (and its nf_seresnet* / nf_ecaresnet*,
which have no weights on the hub). timm's NF-RegNet rounds every width to
a multiple of 8 (nf_regnet_b1 has 10,223,984 parameters, ours 10,019,208)
besides timm's numerics; it would need its own variant like the one above.
Refused with this reason. Also refused: timm's non-dm `nfnet_f*` (no
released weights).
"""
import os
import re
import struct
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from nfnets.checkpoints import torch_layout
from nfnets.checkpoints.errors import CheckpointError

Params = Dict[str, Dict[str, np.ndarray]]

_TOP = 'NFNet_L'
_BLOCK_KEY = re.compile(r'^stages\.(\d+)\.(\d+)\.')
# timm block module -> our block submodule (NFNet-L tree).
_CONVS = {'conv1': 'conv0', 'conv2': 'conv1', 'conv2b': 'conv1b',
          'conv3': 'conv2', 'downsample.conv': 'conv_shortcut'}
_SE = {'attn_last.fc1': 'squeeze_excite/~/linear',
       'attn_last.fc2': 'squeeze_excite/~/linear_1'}
_UNSUPPORTED = (
    "timm's {what} is not supported: its function differs from our "
    "{ours} (timm: avg-pool shortcuts / widths rounded to 8 / PyTorch "
    "padding / gamma in every conv / no skip gain); see "
    "nfnets/checkpoints/timm.py. Supported timm files: dm_nfnet_f0..f6, "
    "eca_nfnet_l0..l2, nfnet_l0, nf_resnet50.")


def is_safetensors(path: str) -> bool:
  """A .safetensors file: 8-byte little-endian header size, then JSON."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    return False
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) < 9 or head[8:9] != b'{':
    return False
  (size,) = struct.unpack('<Q', head[:8])
  return 2 <= size <= os.path.getsize(path) - 8


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{timm key: np.ndarray} of a .safetensors file (no torch needed)."""
  try:
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading .safetensors needs the safetensors package '
                      '(pip install safetensors).') from e
  try:
    return dict(st_numpy.load_file(os.fspath(path)))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: not a readable .safetensors file '
                          f'({type(e).__name__}: {e}).') from e


def _stage_layout(sd: Mapping[str, Any]):
  """(blocks per stage, output width per stage) from 'stages.s.b.conv3'."""
  blocks = sorted({(int(m.group(1)), int(m.group(2)))
                   for m in map(_BLOCK_KEY.match, sd) if m})
  depths, widths = [], []
  for s, b in blocks:
    if s == len(depths):
      depths.append(0)
      widths.append(int(np.shape(sd[f'stages.{s}.{b}.conv3.weight'])[0]))
    depths[-1] += 1
  return blocks, tuple(depths), tuple(widths)


def _is_timm_resnet(sd: Mapping[str, Any]) -> bool:
  """timm's NF-ResNet without attention (nf_resnet26/50/101)."""
  return ('stem.conv.weight' in sd
          and np.shape(sd['stem.conv.weight'])[-1] == 7
          and not any('.attn' in k for k in sd))


def _check_supported(sd: Mapping[str, Any]) -> None:
  if 'stem.conv.weight' in sd and not _is_timm_resnet(sd):
    seven = np.shape(sd['stem.conv.weight'])[-1] == 7
    raise CheckpointError(_UNSUPPORTED.format(
        what='NF-SE/ECA-ResNet (nf_seresnet*, nf_ecaresnet*)' if seven else
        'NF-RegNet (nf_regnet_b*, 3x3 stem)',
        ours='NF-ResNet' if seven else 'NF-RegNet'))
  if _is_timm_resnet(sd) and 'head.fc.weight' in sd:
    return
  if 'stem.conv1.weight' not in sd or 'head.fc.weight' not in sd:
    raise CheckpointError(
        'Not a timm NFNet-family state dict (no stem.conv1 / head.fc); '
        'supported: dm_nfnet_f0..f6, eca_nfnet_l0..l2, nfnet_l0.')


def detect_variant(sd: Mapping[str, Any]) -> str:
  """Our variant name for a timm NFNet-family state dict, or a clear error."""
  import nfnets.models as M  # pylint: disable=g-import-not-at-top
  _check_supported(sd)
  _, depths, widths = _stage_layout(sd)
  if _is_timm_resnet(sd):
    for name in M.variants():
      spec = M.get_variant(name)
      if (spec.family == 'nf_resnet_timm' and tuple(spec.depth) == depths
          and tuple(spec.width) == widths):
        return name
    raise CheckpointError(
        f'timm NF-ResNet with blocks per stage {depths}: only nf_resnet50 '
        f'(3, 4, 6, 3) has a variant here (timm_nf_resnet50).')
  eca = any(k.endswith('attn_last.conv.weight') for k in sd)
  dm = any(k.endswith('skipinit_gain') for k in sd)
  final = int(np.shape(sd['final_conv.weight'])[0])
  for name in M.variants():
    spec = M.get_variant(name)
    if not spec.timm_name or tuple(spec.depth) != depths:
      continue
    if dm and spec.family == 'nfnet' and tuple(spec.width) == widths:
      return name
    if (not dm and spec.family == 'nfnet_l' and tuple(spec.width) == widths
        and (spec.attention == 'eca') == eca
        and int(spec.width[-1] * spec.final_conv_mult) == final):
      return name
  kind = 'dm_nfnet' if dm else ('eca_nfnet' if eca else 'nfnet')
  raise CheckpointError(
      f'timm {kind} state dict with blocks per stage {depths}, widths '
      f'{widths} and a {final}-channel head matches none of our variants '
      '(timm weights load for dm_nfnet_f0..f6, eca_nfnet_l0..l2, nfnet_l0; '
      "timm's non-dm nfnet_f* are not supported).")


def _conv(sd, prefix: str, used: set) -> Dict[str, np.ndarray]:
  used.update(f'{prefix}.{n}' for n in ('weight', 'gain', 'bias'))
  return torch_layout._conv_from_torch(  # pylint: disable=protected-access
      prefix, sd)


def _timm_params(sd: Mapping[str, Any], resnet: bool) -> Params:
  """timm eca_nfnet_l* / nfnet_l0 keys -> the 'NFNet_L' Haiku tree;
  nf_resnet50 keys -> the 'NF_ResNet_T' tree."""
  used: set = set()
  params: Params = {}
  top, block_name = ('NF_ResNet_T', 'nf_res_block') if resnet else (
      _TOP, 'nf_block')
  if resnet:
    params[f'{top}/~/initial_conv'] = _conv(sd, 'stem.conv', used)
  else:
    for i in range(4):
      params[f'{top}/~/stem_conv{i}'] = _conv(sd, f'stem.conv{i + 1}', used)
  blocks, _, _ = _stage_layout(sd)
  for k, (s, b) in enumerate(blocks):
    name = f'{top}/~/{block_name}' + (f'_{k}' if k else '')
    prefix = f'stages.{s}.{b}'
    for timm_name, ours in _CONVS.items():
      if f'{prefix}.{timm_name}.weight' in sd:
        params[f'{name}/~/{ours}'] = _conv(sd, f'{prefix}.{timm_name}', used)
    eca = f'{prefix}.attn_last.conv.weight'
    if eca in sd:
      used.add(eca)
      params[f'{name}/~/eca'] = {'w': np.asarray(sd[eca]).reshape(-1)}
    for timm_name, ours in _SE.items():
      w, bias = f'{prefix}.{timm_name}.weight', f'{prefix}.{timm_name}.bias'
      if w in sd:
        used.update((w, bias))
        w = np.asarray(sd[w])
        params[f'{name}/~/{ours}'] = {
            'w': np.ascontiguousarray(w.reshape(w.shape[:2]).T),
            'b': np.asarray(sd[bias])}
  if not resnet:
    params[f'{top}/~/final_conv'] = _conv(sd, 'final_conv', used)
  used.update(('head.fc.weight', 'head.fc.bias'))
  params[f'{top}/~/linear'] = {
      'w': np.ascontiguousarray(np.asarray(sd['head.fc.weight']).T),
      'b': np.asarray(sd['head.fc.bias'])}
  left = sorted(set(sd) - used)
  if left:
    raise CheckpointError(f'timm state dict has keys without a Haiku '
                          f'counterpart: {left[:10]}.')
  return params


def from_timm(state_dict: Mapping[str, Any], variant: Optional[str] = None
              ) -> Tuple[Params, str]:
  """timm state dict -> (our Haiku params, our variant name).

  Args:
    state_dict: {timm key: array} (numpy arrays or torch tensors).
    variant: our variant name (e.g. for a model built with overrides);
      None -> `detect_variant`.
  """
  to_np = torch_layout._np  # pylint: disable=protected-access
  sd = {k: to_np(v) for k, v in state_dict.items()}
  for k in [k for k in sd if k.endswith('.skipinit_gain')]:
    sd[k] = np.reshape(sd[k], ())  # a scalar; some writers store it as [1]
  _check_supported(sd)
  variant = variant or detect_variant(sd)
  import nfnets.models as M  # pylint: disable=g-import-not-at-top
  family = M.get_variant(variant).family
  try:
    if family == 'nfnet':
      return torch_layout.from_torch_layout(sd), variant
    if family in ('nfnet_l', 'nf_resnet_timm'):
      return _timm_params(sd, family == 'nf_resnet_timm'), variant
  except KeyError as e:
    raise CheckpointError(f'timm state dict lacks {e}.') from None
  raise CheckpointError(f'No timm conversion for {variant} ({family}).')


def read_timm(path: str, variant: Optional[str] = None) -> Tuple[Params, str]:
  """A timm `model.safetensors` -> (our Haiku params, our variant name)."""
  try:
    return from_timm(read_state_dict(path), variant)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
