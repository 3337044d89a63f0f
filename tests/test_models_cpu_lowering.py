"""The CPU lowering of WSConv2D (conv_lowering='cpu': one dense conv per
group, 1x1 convs as matrix products, matmul weight standardisation) computes
the same function and gradients as the XLA lowering, in every family."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets.models as M
from nfnets.models import cpu_conv
from nfnets.models import layers

CASES = [  # (H, C, kernel, stride, groups, out, padding)
    (8, 12, 3, 2, 3, 12, 'SAME'),
    (7, 8, 1, 1, 1, 6, 'SAME'),
    (7, 8, 1, 1, 2, 6, 'SAME'),
    (6, 4, 1, 2, 1, 8, 'SAME'),
    (9, 4, 3, 1, 1, 4, 'VALID'),
    (10, 4, 5, 3, 1, 4, 'SAME'),
    # >= 48 x 48 pixels: strided convs take the phase-split input gradient.
    (48, 4, 3, 2, 2, 4, 'SAME'),
    (49, 3, 3, 2, 1, 5, 'VALID'),
]


@pytest.mark.parametrize('h,c,k,s,g,o,pad', CASES)
def test_cpu_conv_matches_lax_conv(h, c, k, s, g, o, pad):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, h, h, c), jnp.float32)
  w = jnp.asarray(rng.randn(k, k, c // g, o), jnp.float32)
  ref = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (s, s), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=g)
  new = lambda x, w: cpu_conv.conv(x, w, s, pad, g)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  y_new, vjp_new = jax.vjp(new, x, w)
  np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
  ct = jnp.asarray(rng.randn(*y_ref.shape), jnp.float32)
  for a, b in zip(vjp_new(ct), vjp_ref(ct)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('hw,k,stride,pads', [
    ((9, 8), (3, 3), (2, 2), ((0, 1), (1, 1))),
    ((7, 7), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((10, 11), (3, 3), (3, 2), ((1, 1), (0, 2))),
    ((12, 12), (5, 4), (2, 3), ((2, 2), (1, 2))),
    ((8, 8), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((6, 9), (3, 3), (4, 4), ((1, 1), (1, 1))),  # stride > kernel: zero taps
])
def test_strided_conv_input_grad_matches_autodiff(hw, k, stride, pads):
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, *hw, 3), jnp.float32)
  w = jnp.asarray(rng.randn(*k, 3, 4), jnp.float32)
  conv = lambda x: jax.lax.conv_general_dilated(
      x, w, stride, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y, vjp = jax.vjp(conv, x)
  dy = jnp.asarray(rng.randn(*y.shape), jnp.float32)
  np.testing.assert_allclose(
      cpu_conv._strided_conv_input_grad(dy, w, x.shape, stride, pads),
      vjp(dy)[0], rtol=1e-5, atol=1e-5)


def test_wsconv_cpu_and_xla_agree_1x1_and_grads():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 16))
  mk = lambda impl: hk.transform(lambda x: layers.WSConv2D(
      24, 1, conv_lowering=impl, name='conv')(x))
  params = mk('xla').init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.3, params)  # non-trivial gain/bias
  outs, grads = [], []
  for impl in ('xla', 'cpu'):
    f = mk(impl)
    outs.append(f.apply(params, None, x))
    grads.append(jax.grad(lambda p: jnp.sum(f.apply(p, None, x) ** 2))(params))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4), *grads)


def _dot_count(conv_lowering):
  x = jnp.ones((1, 4, 4, 8))
  f = hk.transform(lambda x: layers.WSConv2D(
      8, 1, conv_lowering=conv_lowering)(x))
  params = f.init(jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(lambda p: f.apply(p, None, x))(params).jaxpr
  return sum(e.primitive.name == 'dot_general' for e in jaxpr.eqns)


def test_conv_lowering_is_explicit_per_module():
  assert _dot_count('cpu') == 3  # two standardisation sums + the 1x1 product
  assert _dot_count('xla') == 0
  # None follows the backend (these tests run on the CPU backend).
  assert jax.default_backend() == 'cpu'
  assert _dot_count(None) == 3
  assert layers.default_conv_lowering(1) == 'cpu'
  assert layers.default_conv_lowering(cpu_conv.MAX_SPLIT_GROUPS + 1) == 'xla'


def test_count_flops_ignores_the_lowering():
  kw = dict(width=0.25, depth=(1, 1, 1, 1), group_size=16)
  ref = M.count_flops('F0', 64, num_classes=10, **kw)
  assert M.count_flops('F0', 64, num_classes=10, conv_lowering='cpu',
                       **kw) == ref


@pytest.mark.parametrize('bad', ['split', 'native', 'gpu', 1])
def test_bad_conv_lowering_is_rejected(bad):
  with pytest.raises(ValueError, match='conv_lowering must be None'):
    hk.transform(lambda: layers.WSConv2D(4, conv_lowering=bad)).init(None)
  for name in ('F0', 'nf_resnet26', 'nf_regnet_b0'):
    with pytest.raises(ValueError, match='conv_lowering must be None'):
      M.param_shapes(name, 10, conv_lowering=bad)


# Tiny members of each family with grouped convs (groups > 1 in F0/RegNet).
_TINY = {
    'F0': dict(width=0.125, depth=(1, 1, 1, 1), group_size=16),
    'nf_seresnet26': dict(width=0.125, depth=(1, 1, 1, 1)),
    'nf_regnet_b0': dict(width=0.25, depth=(1, 1, 1, 1)),
}


@pytest.mark.parametrize('name', sorted(_TINY))
def test_cpu_and_xla_lowering_agree_per_family(name):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  fwds = {impl: M.forward_fn(name, 5, conv_lowering=impl, **_TINY[name])
          for impl in ('xla', 'cpu')}
  params = jax.jit(fwds['xla'].init, static_argnums=2)(
      jax.random.PRNGKey(1), x, False)
  # Same parameter tree either way.
  assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
      lambda k: fwds['cpu'].init(k, x, False), jax.random.PRNGKey(1)))
  # Non-zero skip gains and classifier so that every conv matters. (The
  # gradients of each conv arrangement are checked one by one above.)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if 'skip_gain' in jax.tree_util.keystr(p)
      else v + 0.01, params)
  out_x, out_c = [jax.jit(lambda p, f=fwds[i]: f.apply(p, None, x, False,
                                                        True))(params)
                  for i in ('xla', 'cpu')]
  assert set(out_x) == set(out_c)
  scale = float(jnp.abs(out_x['logits']).max())
  assert scale > 0
  np.testing.assert_allclose(out_c['logits'], out_x['logits'], rtol=1e-4,
                             atol=1e-4 * scale)
  for k in out_x:  # every block's signal statistics
    np.testing.assert_allclose(out_c[k], out_x[k], rtol=1e-3, atol=1e-6,
                               err_msg=k)
