"""timm / Hugging Face hub weights (model.safetensors) -> our Haiku models.

The timm state dicts here are built from timm's documented key names and
layouts (nfnets/checkpoints/timm.py's docstring), not by running timm; the
two tiny fixtures under tests/data/timm were written by timm itself
(make_fixtures.py there) together with timm's logits for one image.
"""
import os
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import nfnets.checkpoints as C
import nfnets.models as M
from nfnets.checkpoints import timm as T

DATA = os.path.join(os.path.dirname(__file__), 'data', 'timm')
TINY_L = dict(depth=(1, 1, 1, 1), width=0.0625, group_size=8)
TINY_F = dict(depth=(1, 1, 1, 1), width=0.125)
TINY_R = dict(depth=(1, 1, 1, 1), width=0.0625)

# timm's published parameter counts (timm 1.0.x, 1000 classes; PAPER.md).
TIMM_PARAMS = {'eca_nfnet_l0': 24_143_924, 'eca_nfnet_l1': 41_407_728,
               'eca_nfnet_l2': 56_722_348, 'nfnet_l0': 35_074_488,
               'timm_nf_resnet50': 25_557_032}  # timm's nf_resnet50
TOPS = {'nfnet_l': 'NFNet_L', 'nfnet': 'NFNet', 'nf_resnet_timm': 'NF_ResNet_T'}

# Our block submodule -> timm's (NFNet-L and dm_nfnet agree on these).
_CONVS = {'conv0': 'conv1', 'conv1': 'conv2', 'conv1b': 'conv2b',
          'conv2': 'conv3', 'conv_shortcut': 'downsample.conv'}
_SE = {'squeeze_excite/~/linear': 'attn_last.fc1',
       'squeeze_excite/~/linear_1': 'attn_last.fc2'}


def _block_positions(tree, top):
  """Our block index -> (stage, index in stage), from the conv_shortcuts."""
  block = 'nf_res_block' if top == 'NF_ResNet_T' else 'nf_block'
  n = sum(1 for m in tree if m.startswith(f'{top}/~/{block}')
          and m.endswith('/~/conv0'))
  out, stage, b = {}, -1, 0
  for k in range(n):
    name = f'{top}/~/{block}' + (f'_{k}' if k else '')
    if f'{name}/~/conv_shortcut' in tree:
      stage, b = stage + 1, 0
    out[name], b = (stage, b), b + 1
  return out


def timm_layout(tree, top):
  """{timm key: array} of a Haiku tree, by the documented layout: conv HWIO
  -> OIHW, gain [out] -> [out,1,1,1], SE linears -> 1x1 convs, classifier
  [in,out] -> [out,in], ECA taps [k] -> [1,1,k], skip_gain -> skipinit_gain.
  Works on arrays and on shape-only leaves (zero-stride arrays)."""
  t = lambda a, *axes: np.transpose(a, axes) if axes else a
  sd, blocks = {}, _block_positions(tree, top)

  def conv(prefix, p):
    sd[f'{prefix}.weight'] = t(p['w'], 3, 2, 0, 1)
    sd[f'{prefix}.gain'] = np.reshape(p['gain'], (-1, 1, 1, 1))
    sd[f'{prefix}.bias'] = p['bias']

  for module, p in tree.items():
    rest = module[len(top) + 3:]
    if rest == 'initial_conv':
      conv('stem.conv', p)
    elif rest.startswith('stem_conv'):
      conv(f'stem.conv{int(rest[-1]) + 1}', p)
    elif rest == 'final_conv':
      conv('final_conv', p)
    elif rest == 'linear':
      sd['head.fc.weight'], sd['head.fc.bias'] = t(p['w'], 1, 0), p['b']
    else:
      m = re.match(r'^(nf_(?:res_)?block(?:_\d+)?)(?:/~/(.+))?$', rest)
      s, b = blocks[f'{top}/~/{m.group(1)}']
      sub = m.group(2)
      prefix = f'stages.{s}.{b}'
      if not sub:
        sd[f'{prefix}.skipinit_gain'] = p['skip_gain']
      elif sub in _CONVS:
        conv(f'{prefix}.{_CONVS[sub]}', p)
      elif sub in _SE:
        w = t(p['w'], 1, 0)
        sd[f'{prefix}.{_SE[sub]}.weight'] = np.reshape(w, w.shape + (1, 1))
        sd[f'{prefix}.{_SE[sub]}.bias'] = p['b']
      elif sub == 'eca':
        sd[f'{prefix}.attn_last.conv.weight'] = np.reshape(p['w'], (1, 1, -1))
      else:
        raise AssertionError(f'no timm name for {module}')
  return sd


def _random_tree(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {m: {n: rng.normal(0.0, 0.5, s.shape).astype(np.float32)
              for n, s in d.items()} for m, d in shapes.items()}


def _shape_only(shapes):
  zero = np.zeros((), np.float32)
  return {m: {n: np.broadcast_to(zero, s.shape) for n, s in d.items()}
          for m, d in shapes.items()}


@pytest.fixture(scope='module')
def l_shapes():
  return {name: M.param_shapes(name) for name in TIMM_PARAMS}


@pytest.mark.parametrize('name', sorted(TIMM_PARAMS))
def test_new_variants_have_timms_parameter_counts(name, l_shapes):
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(l_shapes[name]))
  assert count == TIMM_PARAMS[name]


@pytest.mark.parametrize('name', sorted(TIMM_PARAMS))
def test_variant_is_recognised_from_timm_keys_and_from_our_tree(
    name, l_shapes):
  top = TOPS[M.get_variant(name).family]
  sd = timm_layout(_shape_only(l_shapes[name]), top)
  assert T.detect_variant(sd) == name
  assert C.infer_variant(l_shapes[name]) == name


def test_dm_nfnet_is_recognised_as_f_variant():
  sd = timm_layout(_shape_only(M.param_shapes('F0')), 'NFNet')
  assert T.detect_variant(sd) == 'F0'


@pytest.mark.parametrize('timm_name,name,kwargs', [
    ('eca_nfnet_l0', 'eca_nfnet_l0', TINY_L), ('nfnet_l0', 'nfnet_l0', TINY_L),
    ('nf_resnet50', 'timm_nf_resnet50', TINY_R)])
def test_timm_written_file_gives_timms_logits(timm_name, name, kwargs):
  ref = np.load(os.path.join(DATA, f'{timm_name}_tiny_ref.npz'))
  params = C.load_pretrained(
      os.path.join(DATA, f'{timm_name}_tiny.safetensors'), name,
      model_kwargs=kwargs)
  fwd = M.forward_fn(name, 10, **kwargs)
  out = jax.jit(lambda p, x: fwd.apply(p, None, x, False))(params,
                                                           ref['image'])
  np.testing.assert_allclose(out['pool'], ref['pool'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out['logits'], ref['logits'], rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('name,top,kwargs', [
    ('eca_nfnet_l0', 'NFNet_L', TINY_L), ('F0', 'NFNet', TINY_F)])
def test_timm_layout_loads_like_the_native_file(tmp_path, name, top, kwargs):
  shapes = M.param_shapes(name, 10, **kwargs)
  params = _random_tree(shapes)
  timm_file = str(tmp_path / 'model.safetensors')
  save_file({k: np.ascontiguousarray(v)
             for k, v in timm_layout(params, top).items()}, timm_file)
  native = C.save_npz(params, str(tmp_path / 'native.npz'))
  from_timm = C.load_pretrained(timm_file, name, model_kwargs=kwargs)
  from_native = C.load_pretrained(native, name, model_kwargs=kwargs)
  assert jax.tree.structure(from_timm) == jax.tree.structure(from_native)
  for a, b in zip(jax.tree.leaves(from_timm), jax.tree.leaves(from_native)):
    np.testing.assert_array_equal(a, b)
  if top == 'NFNet':  # bit-identical trees; logits are compared for NFNet-L
    return
  fwd = M.forward_fn(name, 10, **kwargs)
  x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  apply = jax.jit(lambda p: fwd.apply(p, None, x, False)['logits'])
  np.testing.assert_array_equal(apply(from_timm), apply(from_native))


@pytest.mark.parametrize('kernel,what', [(7, 'NF-SE/ECA-ResNet'),
                                         (3, 'NF-RegNet')])
def test_unsupported_timm_models_are_refused_with_the_reason(
    tmp_path, kernel, what):
  path = str(tmp_path / 'model.safetensors')
  save_file({'stem.conv.weight': np.zeros((8, 3, kernel, kernel), np.float32),
             'stages.0.0.attn_last.fc1.weight': np.zeros((2, 8, 1, 1),
                                                         np.float32),
             'head.fc.weight': np.zeros((10, 8), np.float32)}, path)
  with pytest.raises(C.CheckpointError,
                     match=f'{re.escape(what)}.*not supported'):
    C.load_pretrained(path)
