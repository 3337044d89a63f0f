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
