"""Backbone features: every family returns {'stem', 'stage1'..'stage4',
'final'} maps whose shapes follow models.feature_info for any input size,
from the same parameters, with the pooled output unchanged."""
import math

import jax
import numpy as np
import pytest

import nfnets.models as M

# One tiny model per family (and the timm NFNet-L family).
TINY = {
    'F0': dict(depth=(1, 1, 1, 1), width=0.125),
    'nf_resnet50': dict(depth=(1, 1, 1, 1), width=0.125),
    'nf_regnet_b0': dict(depth=(1, 1, 1, 1), width=0.25),
    'eca_nfnet_l0': dict(depth=(1, 1, 1, 1), width=0.0625, group_size=8),
    'timm_nf_resnet50': dict(depth=(1, 1, 1, 1), width=0.0625),
}
# Sizes: a multiple of 32 and an odd, non-square one (partial windows).
SIZES = [(32, 32), (45, 38)]
NAMES = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'final')


def _params(name):
  """Random weights of the right shapes (no compiled init)."""
  rng = np.random.default_rng(0)
  shapes = M.param_shapes(name, 7, **TINY[name])
  return jax.tree.map(
      lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32), shapes)


@pytest.mark.parametrize('name', sorted(TINY))
def test_feature_shapes_follow_feature_info(name):
  info = M.feature_info(name, **TINY[name])
  assert tuple(info) == NAMES
  assert [info[k].stride for k in NAMES[1:]] == [4, 8, 16, 32, 32]
  fwd = M.forward_fn(name, 7, **TINY[name])
  shapes = M.param_shapes(name, 7, **TINY[name])
  for h, w in SIZES:
    x = jax.ShapeDtypeStruct((2, h, w, 3), np.float32)
    out = jax.eval_shape(
        lambda p, x: fwd.apply(p, None, x, False, return_features=True),
        shapes, x)
    assert sorted(out['features']) == sorted(NAMES)  # (key-sorted pytree)
    for k in NAMES:
      s, c = info[k].stride, info[k].channels
      assert out['features'][k].shape == (
          2, math.ceil(h / s), math.ceil(w / s), c), (name, (h, w), k)


@pytest.mark.parametrize('name', sorted(TINY))
def test_pooled_output_unchanged_with_features(name):
  fwd = M.forward_fn(name, 7, **TINY[name])
  h, w = SIZES[-1]
  x = np.random.default_rng(1).normal(size=(2, h, w, 3)).astype(np.float32)
  plain, with_features = jax.jit(lambda p: (
      fwd.apply(p, None, x, False),
      fwd.apply(p, None, x, False, return_features=True)))(_params(name))
  np.testing.assert_array_equal(with_features['logits'], plain['logits'])
  np.testing.assert_array_equal(with_features['pool'], plain['pool'])
  # 'final' is the map that is pooled.
  np.testing.assert_allclose(
      with_features['features']['final'].mean(axis=(1, 2)), plain['pool'],
      rtol=1e-5, atol=1e-6)


def test_feature_info_of_full_variants():
  """Channels from the variant tables (papers / timm), strides 4..32."""
  expected = {
      'F0': (128, 256, 512, 1536, 1536, 3072),
      'F3+': (192, 384, 768, 2048, 2048, 4096),
      'nf_resnet50': (64, 256, 512, 1024, 2048, 2048),
      'nf_regnet_b0': (36, 36, 78, 156, 330, 960),
      'eca_nfnet_l0': (128, 256, 512, 1536, 1536, 2304),
  }
  for name, channels in expected.items():
    info = M.feature_info(name)
    assert tuple(i.channels for i in info.values()) == channels, name
  assert M.feature_info('nf_regnet_b0')['stem'].stride == 2
  assert M.feature_info('F0')['stem'].stride == 4
