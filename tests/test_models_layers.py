"""Unit tests of the normalizer-free building blocks."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets.models as M
from nfnets.models import layers


@pytest.mark.parametrize('name', sorted(layers.ACTIVATION_GAMMAS))
def test_gamma_gives_unit_variance(name):
  # The gammas of the release make gamma * act(x) unit-*variance* for
  # x ~ N(0, 1) (e.g. relu: sqrt(2 / (1 - 1/pi)) = 1.7139).
  x = jax.random.normal(jax.random.PRNGKey(0), (1_000_000, 2), jnp.float32)
  y = np.asarray(layers.get_activation(name)(x), np.float64)
  if name == 'identity':
    assert layers.ACTIVATION_GAMMAS[name] == 1.0
  np.testing.assert_allclose(y.var(), 1.0, rtol=1e-2)


def test_gamma_constants_of_the_paper():
  assert layers.ACTIVATION_GAMMAS['gelu'] == 1.7015043497085571
  assert layers.ACTIVATION_GAMMAS['relu'] == 1.7139588594436646
  assert layers.ACTIVATION_GAMMAS['silu'] == 1.7881293296813965
  # The release estimated gammas by sampling; ReLU's closed form agrees to 1e-3.
  np.testing.assert_allclose(layers.ACTIVATION_GAMMAS['relu'],
                             np.sqrt(2 / (1 - 1 / np.pi)), rtol=1e-3)


def test_swish_alias_and_unknown_activation():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_array_equal(layers.get_activation('swish')(x),
                                layers.get_activation('silu')(x))
  with pytest.raises(ValueError, match='Unknown activation.*gelu'):
    layers.get_activation('gelux')


def _conv_apply(x, **kw):
  f = hk.transform(lambda x: layers.WSConv2D(name='conv', **kw)(x))
  params = f.init(jax.random.PRNGKey(0), x)
  return f, params


def test_wsconv_standardisation_and_output():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 6))
  f, params = _conv_apply(x, output_channels=4, kernel_shape=3, stride=2)
  p = params['conv']
  assert p['w'].shape == (3, 3, 6, 4) and p['gain'].shape == (4,)
  assert p['bias'].shape == (4,) and p['w'].dtype == jnp.float32
  # Non-trivial gain and bias.
  p = {'w': p['w'] * 3 + 0.5, 'gain': jnp.arange(1., 5.), 'bias': jnp.ones(4)}
  out = f.apply({'conv': p}, None, x)
  w = np.asarray(p['w'], np.float64)
  fan_in = 3 * 3 * 6
  w_hat = (w - w.mean((0, 1, 2))) / np.sqrt(
      np.maximum(w.var((0, 1, 2)) * fan_in, 1e-4)) * np.arange(1., 5.)
  # Standardised weight: zero mean and variance gain^2 / fan_in per output.
  np.testing.assert_allclose(w_hat.mean((0, 1, 2)), 0, atol=1e-12)
  np.testing.assert_allclose(w_hat.var((0, 1, 2)) * fan_in,
                             np.arange(1., 5.) ** 2, rtol=1e-6)
  ref = jax.lax.conv_general_dilated(
      x, jnp.asarray(w_hat, jnp.float32), (2, 2), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + 1.0
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_wsconv_cpu_groups_equals_xla():
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 12))
  kw = dict(output_channels=12, kernel_shape=3, stride=2,
            feature_group_count=3)
  f_native, params = _conv_apply(x, conv_lowering='xla', **kw)
  f_split, _ = _conv_apply(x, conv_lowering='cpu', **kw)
  assert params['conv']['w'].shape == (3, 3, 4, 12)
  np.testing.assert_allclose(f_native.apply(params, None, x),
                             f_split.apply(params, None, x),
                             rtol=1e-5, atol=1e-5)
  g = lambda f: jax.grad(lambda p: jnp.sum(f.apply(p, None, x) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               g(f_native), g(f_split))


def test_wsconv_bf16_input_keeps_f32_params():
  x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
  f, params = _conv_apply(x, output_channels=5)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
  assert f.apply(params, None, x).dtype == jnp.bfloat16


def test_wsconv_bad_groups():
  x = jnp.ones((1, 4, 4, 6))
  with pytest.raises(ValueError, match='not divisible by 4 groups'):
    _conv_apply(x, output_channels=8, feature_group_count=4)


def test_stochastic_depth():
  x = jnp.ones((4000, 2, 2, 3))
  f = hk.transform(lambda x, t: layers.stochastic_depth(x, 0.25, t))
  np.testing.assert_array_equal(f.apply({}, None, x, False), x)
  out = np.asarray(f.apply({}, jax.random.PRNGKey(0), x, True))
  per_example = out.reshape(4000, -1)
  # One Bernoulli per example, kept values not rescaled.
  assert set(np.unique(per_example)) <= {0.0, 1.0}
  assert np.all(per_example.min(1) == per_example.max(1))
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03


@pytest.mark.parametrize('rate', [0.0, -0.1, 1.0, 1.5])
def test_stochastic_depth_off_outside_open_unit_interval(rate):
  # As the release's blocks: stochastic depth only for 0 < rate < 1; no rng
  # key is needed (or drawn) otherwise, even in training.
  x = jnp.ones((64, 2, 2, 3))
  f = hk.transform(lambda x: layers.stochastic_depth(x, rate, True))
  np.testing.assert_array_equal(f.apply({}, None, x), x)


def test_stochastic_depth_high_rate_still_drops():
  x = jnp.ones((4000, 1, 1, 1))
  f = hk.transform(lambda x: layers.stochastic_depth(x, 0.99, True))
  kept = np.asarray(f.apply({}, jax.random.PRNGKey(0), x)).mean()
  assert 0 < kept < 0.03


def test_squeeze_excite_names_and_range():
  f = hk.transform(lambda x: layers.SqueezeExcite(8, 8, 0.5,
                                                  name='squeeze_excite')(x))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 8))
  params = f.init(jax.random.PRNGKey(1), x)
  assert set(params) == {'squeeze_excite/~/linear', 'squeeze_excite/~/linear_1'}
  assert params['squeeze_excite/~/linear']['w'].shape == (8, 4)
  out = f.apply(params, None, x)
  assert out.shape == (2, 1, 1, 8)
  assert np.all((out > 0) & (out < 1))


def test_squeeze_excite_init_is_hk_linear_default():
  # The release's SE layers are hk.Linear with the default init: a normal of
  # stddev 1/sqrt(fan_in) truncated at +-2 stddevs, not rescaled, so the
  # samples' std is 0.8796/sqrt(fan_in); biases zero.
  fan_in, hidden = 1024, 512
  f = hk.transform(lambda x: layers.SqueezeExcite(fan_in, fan_in, 0.5,
                                                  name='squeeze_excite')(x))
  params = f.init(jax.random.PRNGKey(3), jnp.zeros((1, 2, 2, fan_in)))
  w0 = np.asarray(params['squeeze_excite/~/linear']['w'])
  w1 = np.asarray(params['squeeze_excite/~/linear_1']['w'])
  assert w0.shape == (fan_in, hidden) and w1.shape == (hidden, fan_in)
  for w, n in ((w0, fan_in), (w1, hidden)):
    std = 1 / np.sqrt(n)
    np.testing.assert_allclose(w.std(), 0.8796 * std, rtol=0.01)
    assert np.abs(w).max() <= 2 * std + 1e-7
    assert abs(w.mean()) < 0.01 * std
  for k in ('linear', 'linear_1'):
    np.testing.assert_array_equal(params[f'squeeze_excite/~/{k}']['b'], 0)


def test_block_schedule_resets_after_transitions():
  alpha = 0.2
  slots = layers.block_schedule((1, 3), alpha)
  betas = [s.beta for s in slots]
  # Block 0 sees the stem (var 1); then 1 + a^2, then 1 + 2a^2 in stage 0...
  # Stage 1's transition sees var 1 + a^2 (reset after block 0, +a^2).
  np.testing.assert_allclose(
      betas, [1.0, (1 + alpha**2) ** -0.5, (1 + alpha**2) ** -0.5,
              (1 + 2 * alpha**2) ** -0.5])
  assert [s.first_in_stage for s in slots] == [True, True, False, False]
  np.testing.assert_allclose([s.depth_fraction for s in slots],
                             [0, 0.25, 0.5, 0.75])


def test_init_params_matches_default_compilation():
  # models.init_params compiles the initialisers without XLA:CPU's backend
  # optimisations; the params must be those of a default jit (same RNG
  # stream, same shapes) up to float32 rounding.
  def fn(x, is_training):
    h = layers.WSConv2D(8, 3, name='conv')(x)
    return layers.Linear(5, name='linear')(jnp.mean(h, axis=(1, 2)))
  f = hk.transform(fn)
  x = jnp.zeros((1, 6, 6, 3))
  rng = jax.random.PRNGKey(7)
  ours = M.init_params(f, rng, x)
  ref = jax.jit(lambda r: f.init(r, x, True))(rng)
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert isinstance(a, np.ndarray) and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.std(ours['conv']['w']) > 0.1  # really initialised, not zeros
