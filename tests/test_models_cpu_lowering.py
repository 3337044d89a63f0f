"""The CPU lowering of WSConv2D (group_conv_impl='split': one dense conv per
group, 1x1 convs as matrix products, matmul weight standardisation) computes
the same function and gradients as the plain lowering."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  new = lambda x, w: layers.cpu_conv(x, w, s, pad, g)
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
      layers._strided_conv_input_grad(dy, w, x.shape, stride, pads),
      vjp(dy)[0], rtol=1e-5, atol=1e-5)


def test_wsconv_split_and_native_agree_1x1_and_grads():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 16))
  mk = lambda impl: hk.transform(lambda x: layers.WSConv2D(
      24, 1, group_conv_impl=impl, name='conv')(x))
  params = mk('native').init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.3, params)  # non-trivial gain/bias
  outs, grads = [], []
  for impl in ('native', 'split'):
    f = mk(impl)
    outs.append(f.apply(params, None, x))
    grads.append(jax.grad(lambda p: jnp.sum(f.apply(p, None, x) ** 2))(params))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4), *grads)


def test_reference_lowering_context():
  x = jnp.ones((1, 4, 4, 8))
  f = hk.transform(lambda x: layers.WSConv2D(8, 1, group_conv_impl='split')(x))
  params = f.init(jax.random.PRNGKey(0), x)
  count = lambda: sum(e.primitive.name == 'dot_general' for e in
                      jax.make_jaxpr(lambda p: f.apply(p, None, x))(
                          params).jaxpr.eqns)
  assert count() == 3  # two standardisation sums + the 1x1 product
  with layers.reference_lowering():
    assert count() == 0
