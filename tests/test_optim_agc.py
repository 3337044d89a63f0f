"""Tests for nfnets.optim.adaptive_grad_clip and the parameter-group masks."""

import doctest

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import nfnets.optim as nfo
from nfnets.optim import adaptive_grad_clip, agc_mask, weight_decay_mask

# ------------------------------------------------------------------------------
# Independent NumPy reference (float64, explicit loop over output units).


def np_agc_leaf(g, w, clipping, eps=1e-3, unit_last=True):
  g = np.asarray(g, np.float64)
  w = np.asarray(w, np.float64)
  if g.ndim <= 1 or not unit_last:
    units = [(Ellipsis,)]
  else:
    units = [(Ellipsis, j) for j in range(g.shape[-1])]
  out = g.copy()
  for u in units:
    gn = np.sqrt(np.sum(g[u] ** 2))
    wn = max(np.sqrt(np.sum(w[u] ** 2)), eps)
    if gn / wn > clipping:
      out[u] = g[u] * (clipping * wn / gn)
  return out


def np_agc(grads, params, clipping, eps=1e-3):
  return jax.tree.map(lambda g, w: np_agc_leaf(g, w, clipping, eps),
                      grads, params)


SHAPES = {
    'NFNet/~/nf_block': {'skip_gain': ()},
    'NFNet/~/conv': {'w': (3, 3, 4, 6), 'gain': (6,), 'bias': (6,)},
    'NFNet/~/nf_block/~/squeeze_excite/~/linear': {'w': (6, 3), 'b': (3,)},
    'NFNet/~/linear': {'w': (6, 5), 'b': (5,)},
    'conv1d': {'w': (3, 4, 2)},
}


def random_tree(seed, shapes=SHAPES, dtype=np.float32):
  rng = np.random.default_rng(seed)

  def make(shape):
    # Mixed scales so that, per unit, some clip and some do not.
    scale = 10.0 ** rng.uniform(-3, 1, size=shape[-1:] if shape else ())
    return (rng.standard_normal(shape) * scale).astype(dtype)

  is_shape = lambda x: isinstance(x, tuple)
  params = jax.tree.map(make, shapes, is_leaf=is_shape)
  grads = jax.tree.map(make, shapes, is_leaf=is_shape)
  return params, grads


def assert_tree_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
      atol=atol), a, b)


# ------------------------------------------------------------------------------
# Exactness.


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('clipping', [0.01, 0.1, 1.0])
def test_matches_numpy_reference(seed, clipping):
  params, grads = random_tree(seed)
  tx = adaptive_grad_clip(clipping)
  out, _ = tx.update(grads, tx.init(params), params)
  assert_tree_close(out, np_agc(grads, params, clipping))
  # Some units clipped, some not (the test is not vacuous).
  flat_g = jax.tree.leaves(grads)
  flat_o = jax.tree.leaves(out)
  changed = sum(int(not np.array_equal(g, o)) for g, o in zip(flat_g, flat_o))
  assert 0 < changed or clipping == 1.0


def test_jit_matches_eager_and_dtype_preserved():
  params, grads = random_tree(3)
  tx = adaptive_grad_clip(0.05)
  eager, _ = tx.update(grads, tx.init(params), params)
  jitted, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert_tree_close(eager, jitted, rtol=1e-6)
  jax.tree.map(lambda a, b: (a.dtype == b.dtype) or pytest.fail('dtype'),
               jitted, grads)
  chex.assert_trees_all_equal_shapes(jitted, grads)


def test_state_is_empty_without_stats():
  tx = adaptive_grad_clip(0.01, stats=False)
  params, _ = random_tree(0)
  state = tx.init(params)
  assert jax.tree.leaves(state) == []


def _optax_comparable_shapes():
  # Conventions agree for ndim 0, 1, 2 (no size-1 axis), 4 and 5.
  return {
      'a': {'scalar': (), 'vec': (7,), 'lin': (5, 4)},
      'b': {'conv': (3, 3, 4, 8), 'conv3d': (2, 2, 2, 3, 4)},
  }


@pytest.mark.parametrize('clipping', [0.01, 0.2])
def test_equals_optax_where_conventions_match(clipping):
  params, grads = random_tree(7, _optax_comparable_shapes())
  ours = adaptive_grad_clip(clipping)
  ref = optax.adaptive_grad_clip(clipping)
  a, _ = jax.jit(ours.update)(grads, ours.init(params), params)
  b, _ = jax.jit(ref.update)(grads, ref.init(params), params)
  assert_tree_close(a, b, rtol=1e-6)


def test_ndim3_differs_from_optax_but_matches_with_explicit_axes():
  # optax: ndim 3 = multi-head linear [I, H, D] -> reduce axis 0 only.
  # ours: default reduces all but the last axis (Conv1D WIO).
  params, grads = random_tree(5, {'m': {'w': (6, 3, 4)}})
  ref, _ = optax.adaptive_grad_clip(0.05).update(grads, None, params)
  ours_default, _ = adaptive_grad_clip(0.05).update(grads, None, params)
  ours_mha, _ = adaptive_grad_clip(0.05, unit_axes={r'^m/': (0,)}).update(
      grads, None, params)
  assert_tree_close(ours_mha, ref, rtol=1e-6)
  assert not np.allclose(ours_default['m']['w'], ref['m']['w'])
  # and optax with axis=(0, 1) equals our default
  ref01, _ = optax.adaptive_grad_clip(0.05, axis=(0, 1)).update(
      grads, None, params)
  assert_tree_close(ours_default, ref01, rtol=1e-6)


# ------------------------------------------------------------------------------
# Properties (hypothesis).

_shape = st.sampled_from([(), (1,), (5,), (4, 3), (1, 6), (2, 3, 4),
                          (3, 3, 2, 5), (1, 1, 4, 2)])


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(shape=_shape, seed=st.integers(0, 2**31 - 1),
       g_scale=st.floats(-6, 3), w_scale=st.floats(-6, 2),
       clipping=st.sampled_from([1e-3, 0.01, 0.08, 0.5, 2.0]))
def test_property_bound_and_untouched(shape, seed, g_scale, w_scale,
                                      clipping):
  rng = np.random.default_rng(seed)
  g = (rng.standard_normal(shape) * 10.0 ** g_scale).astype(np.float32)
  w = (rng.standard_normal(shape) * 10.0 ** w_scale).astype(np.float32)
  if rng.uniform() < 0.2:  # some zero parameters (eps path)
    w = np.zeros_like(w)
  eps = 1e-3
  out = np.asarray(adaptive_grad_clip(clipping, eps).update(
      {'x': g}, None, {'x': w})[0]['x'])
  axes = nfo.default_unit_axes('x', w)
  norm = lambda x: np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes,
                                  keepdims=True))
  bound = clipping * np.maximum(norm(w), eps)
  assert np.all(norm(out) <= bound * (1 + 1e-5))
  below = np.broadcast_to(norm(g) <= bound * (1 - 1e-6), g.shape)
  np.testing.assert_array_equal(out[below], g[below])  # bit-exact
  # clipped units point the same way as before
  above = ~below
  if above.any():
    assert np.all(np.sign(out[above]) == np.sign(g[above]))


# ------------------------------------------------------------------------------
# Dtypes and edge cases.


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_grads(dtype):
  params, grads = random_tree(11)
  grads_lp = jax.tree.map(lambda g: jnp.asarray(g, dtype), grads)
  out, _ = jax.jit(adaptive_grad_clip(0.02).update)(grads_lp, None, params)
  jax.tree.map(lambda o: o.dtype == dtype or pytest.fail(str(o.dtype)), out)
  ref = np_agc(jax.tree.map(lambda g: np.asarray(g, np.float32), grads_lp),
               params, 0.02)
  assert_tree_close(out, ref, rtol=1e-2, atol=1e-6)


def test_grouped_small_leaves_mixed_sizes_and_dtypes():
  # Whole-tensor leaves are grouped in padded buckets internally; check sizes
  # 0, 1, bucket edges, one above the grouping limit, and mixed dtypes.
  rng = np.random.default_rng(0)
  sizes = [0, 1, 2, 3, 4, 5, 8, 9, 64, 65, 1000, 65536, 65537]
  params = {f'v{n}': (rng.standard_normal(n) * 0.1).astype(np.float32)
            for n in sizes}
  params['s'] = np.float32(0.5)
  grads = {k: (rng.standard_normal(np.shape(v)) *
               rng.choice([1e-5, 1e-2, 10.0])).astype(np.float32)
           for k, v in params.items()}
  grads['v9'] = grads['v9'].astype(jnp.bfloat16)
  params['v8'] = params['v8'].astype(jnp.bfloat16)
  out, _ = jax.jit(adaptive_grad_clip(0.05).update)(grads, None, params)
  ref = np_agc(jax.tree.map(lambda x: np.asarray(x, np.float32), grads),
               jax.tree.map(lambda x: np.asarray(x, np.float32), params), 0.05)
  assert out['v9'].dtype == jnp.bfloat16 and out['v0'].shape == (0,)
  for k in params:
    tol = 1e-2 if k == 'v9' else 1e-5
    np.testing.assert_allclose(np.asarray(out[k], np.float32), ref[k],
                               rtol=tol, atol=1e-8, err_msg=k)
  # differentiable through the grouped path with zero grads / zero params
  zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), params)
  d = jax.jit(jax.grad(lambda g: sum(jnp.sum(x) for x in jax.tree.leaves(
      adaptive_grad_clip(0.01).update(g, None, zeros)[0]))))(zeros)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(d))


def test_float16_norm_does_not_overflow():
  # sum of squares = 4096 * 300^2 ~ 3.7e8 overflows float16 (max 65504); the
  # norm must be computed in float32.
  g = jnp.full((64, 64), 300.0, jnp.float16)
  w = jnp.ones((64, 64), jnp.float32)
  out, _ = adaptive_grad_clip(0.01).update({'w': g}, None, {'w': w})
  out = np.asarray(out['w'], np.float32)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(np.linalg.norm(out[:, 0]), 0.01 * 8.0, rtol=2e-3)


def test_zero_grads_and_zero_params_no_nan():
  params = {'w': jnp.zeros((3, 3, 2, 4)), 'g': jnp.zeros((4,)),
            's': jnp.zeros(())}
  grads = jax.tree.map(jnp.zeros_like, params)
  out, _ = jax.jit(adaptive_grad_clip(0.01).update)(grads, None, params)
  for x in jax.tree.leaves(out):
    assert np.all(np.asarray(x) == 0)
  # nonzero grads on zero params: clipped to clipping * eps, still finite
  grads = jax.tree.map(jnp.ones_like, params)
  out, _ = adaptive_grad_clip(0.01, eps=1e-3).update(grads, None, params)
  np.testing.assert_allclose(float(jnp.linalg.norm(out['g'])), 1e-5, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.abs(out['s'])), 1e-5, rtol=1e-5)
  # and the gradient of AGC at zero is finite (no NaN in backward either)
  d = jax.grad(lambda g: jnp.sum(adaptive_grad_clip(0.01).update(
      {'w': g}, None, {'w': jnp.ones((3, 2))})[0]['w']))(jnp.zeros((3, 2)))
  assert np.all(np.isfinite(d))


def test_params_none_raises():
  tx = adaptive_grad_clip(0.01)
  with pytest.raises(ValueError, match='needs the current parameters'):
    tx.update({'w': jnp.ones(3)}, tx.init({'w': jnp.ones(3)}))


def test_bad_unit_axes_names_path_and_shape():
  params, grads = random_tree(0)
  tx = adaptive_grad_clip(0.01, unit_axes=(0, 1, 2))
  with pytest.raises(ValueError) as e:
    tx.update(grads, None, params)
  msg = str(e.value)
  assert "'NFNet/~/conv/bias' with shape (6,)" in msg
  # A mapping override for one leaf with a wrong axis count.
  tx = adaptive_grad_clip(0.01, unit_axes={r'squeeze_excite/~/linear/w$':
                                           (0, 1, 2)})
  with pytest.raises(ValueError, match=r"squeeze_excite/~/linear/w.*\(6, 3\)"):
    tx.update(grads, None, params)
  # Callable override returning garbage.
  tx = adaptive_grad_clip(0.01, unit_axes=lambda path, leaf: 'rows')
  with pytest.raises(ValueError, match='must contain ints'):
    tx.update(grads, None, params)
  with pytest.raises(ValueError, match='repeated'):
    adaptive_grad_clip(0.01, unit_axes=(0, -2)).update(
        {'w': jnp.ones((2, 3))}, None, {'w': jnp.ones((2, 3))})
  with pytest.raises(TypeError):
    adaptive_grad_clip(0.01, unit_axes=1.5)
  with pytest.raises(ValueError, match='clipping'):
    adaptive_grad_clip(-1.0)


def test_structure_and_shape_mismatch_raise():
  tx = adaptive_grad_clip(0.01)
  with pytest.raises(ValueError, match='tree structures'):
    tx.update({'a': jnp.ones(2)}, None, {'b': jnp.ones(2)})
  with pytest.raises(ValueError, match="'a'.*shape"):
    tx.update({'a': jnp.ones(2)}, None, {'a': jnp.ones(3)})


def test_unit_axes_callable_and_mapping():
  params, grads = random_tree(4, {'x': {'w': (4, 5)}, 'y': {'w': (4, 5)}})
  # Rows as units (a [O, I] torch-style layout) for 'x' only.
  ref_x = np_agc_leaf(grads['x']['w'].T, params['x']['w'].T, 0.05).T
  ref_y = np_agc_leaf(grads['y']['w'], params['y']['w'], 0.05)
  for spec in ({r'^x/': (1,)},
               lambda path, leaf: (1,) if path.startswith('x/') else
               nfo.default_unit_axes(path, leaf)):
    out, _ = adaptive_grad_clip(0.05, unit_axes=spec).update(
        grads, None, params)
    np.testing.assert_allclose(out['x']['w'], ref_x, rtol=1e-5)
    np.testing.assert_allclose(out['y']['w'], ref_y, rtol=1e-5)
  # None = whole tensor
  out, _ = adaptive_grad_clip(0.05, unit_axes=lambda p, l: None).update(
      grads, None, params)
  np.testing.assert_allclose(
      out['x']['w'], np_agc_leaf(grads['x']['w'], params['x']['w'], 0.05,
                                 unit_last=False), rtol=1e-5)


def test_docstring_example():
  import nfnets.optim.agc as agc_mod
  res = doctest.testmod(agc_mod, raise_on_error=False, verbose=False)
  assert res.attempted > 0 and res.failed == 0, res


# ------------------------------------------------------------------------------
# Combinators.


def test_in_chain_before_optimizer():
  params, grads = random_tree(1)
  tx = optax.chain(adaptive_grad_clip(0.01), optax.sgd(0.5))
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert_tree_close(u, jax.tree.map(lambda x: -0.5 * x,
                                    np_agc(grads, params, 0.01)))


def test_masked_and_partition():
  params, grads = random_tree(2)
  mask = agc_mask(params)
  tx = optax.masked(adaptive_grad_clip(0.01), agc_mask)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref = np_agc(grads, params, 0.01)
  np.testing.assert_array_equal(u['NFNet/~/linear']['w'],
                                grads['NFNet/~/linear']['w'])
  assert mask['NFNet/~/linear']['b']  # the release clips the bias
  expect = jax.tree.map(lambda m, r, g: r if m else g, mask, ref, grads)
  assert_tree_close(u, expect)

  tx = optax.partition(
      {'classifier': optax.identity(),
       'no_decay': adaptive_grad_clip(0.01),
       'weights': adaptive_grad_clip(0.02)},
      nfo.param_labels)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  labels = nfo.param_labels(params)
  ref2 = np_agc(grads, params, 0.02)
  expect = jax.tree.map(
      lambda l, r1, r2, g: {'classifier': g, 'no_decay': r1,
                            'weights': r2}[l], labels, ref, ref2, grads)
  assert_tree_close(u, expect)


def test_inject_hyperparams_schedules_clipping():
  params, grads = random_tree(3)
  sched = lambda count: 0.01 * (count + 1)
  tx = optax.inject_hyperparams(adaptive_grad_clip)(clipping=sched)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(3):
    u, state = step(grads, state, params)
    assert_tree_close(u, np_agc(grads, params, 0.01 * (t + 1)), rtol=2e-5)
  assert float(state.hyperparams['clipping']) == pytest.approx(0.03)
  # A callable unit_axes must be declared static (optax treats callables as
  # schedules otherwise).
  tx = optax.inject_hyperparams(adaptive_grad_clip, static_args='unit_axes')(
      clipping=0.01, unit_axes=nfo.default_unit_axes)
  u, _ = tx.update(grads, tx.init(params), params)
  assert_tree_close(u, np_agc(grads, params, 0.01))


def test_multisteps():
  params, g1 = random_tree(4)
  _, g2 = random_tree(5)
  tx = optax.MultiSteps(optax.chain(adaptive_grad_clip(0.01), optax.sgd(1.0)),
                        every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u1, state = step(g1, state, params)
  for x in jax.tree.leaves(u1):
    assert np.all(np.asarray(x) == 0)
  u2, state = step(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  assert_tree_close(u2, jax.tree.map(lambda x: -x,
                                     np_agc(mean, params, 0.01)), rtol=2e-5)


def test_apply_if_finite():
  params, grads = random_tree(6)
  tx = optax.apply_if_finite(adaptive_grad_clip(0.01), max_consecutive_errors=3)
  state = tx.init(params)
  step = jax.jit(tx.update)
  u, state = step(grads, state, params)
  assert_tree_close(u, np_agc(grads, params, 0.01))
  bad = jax.tree.map(lambda g: g, grads)
  bad['NFNet/~/conv']['w'] = bad['NFNet/~/conv']['w'].copy()
  bad['NFNet/~/conv']['w'][0, 0, 0, 0] = np.nan
  u, state = step(bad, state, params)
  assert int(state.notfinite_count) == 1
  for x in jax.tree.leaves(u):
    assert np.all(np.asarray(x) == 0)


def test_pmap_step_on_8_devices():
  n = jax.local_device_count()
  if n < 8:
    pytest.skip(f'needs 8 devices (tests/conftest.py sets XLA_FLAGS); got {n}')
  params, _ = random_tree(8)
  rng = np.random.default_rng(0)
  per_dev = jax.tree.map(
      lambda p: (rng.standard_normal((n,) + p.shape) * 3).astype(np.float32),
      params)
  tx = optax.chain(adaptive_grad_clip(0.01), optax.sgd(0.1, momentum=0.9,
                                                       nesterov=True))

  def step(grads, state, params):
    grads = jax.lax.pmean(grads, 'i')  # AGC sees the averaged gradient
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rep = lambda t: jax.tree.map(lambda x: np.broadcast_to(x, (n,) + x.shape),
                               t)
  new_params, _ = jax.pmap(step, axis_name='i')(
      per_dev, rep(tx.init(params)), rep(params))
  mean = jax.tree.map(lambda g: g.mean(0), per_dev)
  expect = jax.tree.map(lambda p, c: p - 0.1 * 1.9 * c, params,
                        np_agc(mean, params, 0.01))
  for x in jax.tree.leaves(new_params):  # identical on every device
    np.testing.assert_array_equal(x[0], x[-1])
  assert_tree_close(jax.tree.map(lambda x: x[0], new_params), expect,
                    rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------
# Masks over real Haiku trees.


def _tiny_haiku_params():
  fwd = hk.transform(lambda x: _TinyNet()(x))
  return fwd.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))


class _SE(hk.Module):
  """Submodules created in __init__, as in the release -> '/~/' paths."""

  def __init__(self, ch):
    super().__init__(name='squeeze_excite')
    self.fc0 = hk.Linear(2)
    self.fc1 = hk.Linear(ch)

  def __call__(self, x):
    h = self.fc0(x.mean((1, 2)))
    return x * jax.nn.sigmoid(self.fc1(h))[:, None, None]


class _Block(hk.Module):
  def __init__(self, name):
    super().__init__(name=name)
    self.conv0 = hk.Conv2D(4, 3, name='conv0')
    self.se = _SE(4)

  def __call__(self, x):
    s = hk.get_parameter('skip_gain', (), init=jnp.zeros)
    return x + s * self.se(self.conv0(x))


class _TinyNet(hk.Module):
  def __init__(self):
    super().__init__(name='NFNet')
    self.stem = hk.Conv2D(4, 3, name='stem_conv0')
    self.block = _Block(name='nf_block')
    self.fc = hk.Linear(3, name='linear')

  def __call__(self, x):
    return self.fc(self.block(self.stem(x)).mean((1, 2)))


def test_masks_on_haiku_tree():
  params = _tiny_haiku_params()
  paths = jax.tree.leaves(nfo.tree_paths(params))
  assert 'NFNet/~/linear/w' in paths
  assert 'NFNet/~/nf_block/~/squeeze_excite/~/linear/w' in paths
  m = agc_mask(params)
  assert m['NFNet/~/linear'] == {'w': False, 'b': True}  # as the release
  assert m['NFNet/~/nf_block/~/squeeze_excite/~/linear'] == {'w': True,
                                                             'b': True}
  assert m['NFNet/~/nf_block'] == {'skip_gain': True}
  # a kernel-only regex gives the same groups
  m = agc_mask(params, classifier_regex=r'^[^/]+/(?:~/)?linear/w$')
  assert m['NFNet/~/linear'] == {'w': False, 'b': True}
  assert agc_mask(params, classifier_regex=None)['NFNet/~/linear'] == {
      'w': True, 'b': True}
  m = agc_mask(params, exclude=('stem_conv0',))
  assert m['NFNet/~/stem_conv0'] == {'w': False, 'b': False}
  wd = weight_decay_mask(params)
  assert wd['NFNet/~/linear'] == {'w': True, 'b': False}
  assert wd['NFNet/~/nf_block'] == {'skip_gain': False}
  assert wd['NFNet/~/stem_conv0'] == {'w': True, 'b': False}
  # Haiku names a classifier created in __call__ 'NFNet/linear': also matched.
  assert agc_mask({'NFNet/linear': {'w': 1, 'b': 2},
                   'NFNet/linear_1': {'w': 1}}) == {
                       'NFNet/linear': {'w': False, 'b': True},
                       'NFNet/linear_1': {'w': True}}
  with pytest.raises(ValueError, match='matches no leaf'):
    agc_mask({'mlp': {'w': jnp.ones((2, 2))}})
  assert agc_mask({'mlp': {'w': jnp.ones((2, 2))}}, missing_ok=True) == {
      'mlp': {'w': True}}


def test_masks_on_nested_containers():
  tree = {'enc': [jnp.ones((2, 3)), jnp.ones((3,))], 'head': {'gain': 1.0}}
  assert jax.tree.leaves(nfo.tree_paths(tree)) == ['enc/0', 'enc/1',
                                                   'head/gain']
  assert weight_decay_mask(tree) == {'enc': [True, False],
                                     'head': {'gain': False}}


def test_masks_on_real_nfnet_f0_tree():
  models = pytest.importorskip('nfnets.models')
  shapes = models.param_shapes('F0')
  m = agc_mask(shapes)
  off = [p for p, v in zip(jax.tree.leaves(nfo.tree_paths(shapes)),
                           jax.tree.leaves(m)) if not v]
  assert off == ['NFNet/~/linear/w']  # the classifier bias is clipped
  wd = weight_decay_mask(shapes)
  for path, leaf, v in zip(jax.tree.leaves(nfo.tree_paths(shapes)),
                           jax.tree.leaves(shapes), jax.tree.leaves(wd)):
    assert v == (leaf.ndim >= 2), path


# ----------------------------------------------------------------------------
# Clipping statistics (AGCState, agc_statistics, param_groups).

LAM = 0.1
# A Haiku-named tree: stem, two blocks in stage 1 (the first with a
# shortcut), one block per later stage, final conv and classifier.
# module -> (group, {param: shape}).
STATS_TREE = {
    'NFNet/~/stem_conv0': ('stem', {'w': (3, 3, 3, 4), 'gain': (4,)}),
    'NFNet/~/nf_block/~/conv_shortcut': ('stage1', {'w': (1, 1, 4, 6)}),
    'NFNet/~/nf_block/~/conv0': ('stage1', {'w': (1, 1, 4, 5)}),
    'NFNet/~/nf_block': ('stage1', {'skip_gain': ()}),
    'NFNet/~/nf_block_1/~/conv0': ('stage1', {'w': (1, 1, 6, 7)}),
    'NFNet/~/nf_block_2/~/conv_shortcut': ('stage2', {'w': (1, 1, 6, 8)}),
    'NFNet/~/nf_block_3/~/conv_shortcut': ('stage3', {'w': (1, 1, 8, 3)}),
    'NFNet/~/nf_block_3/~/squeeze_excite/~/linear': (
        'stage3', {'w': (3, 2), 'b': (2,)}),
    'NFNet/~/nf_block_4/~/conv_shortcut': ('stage4', {'w': (1, 1, 3, 9)}),
    'NFNet/~/final_conv': ('head', {'w': (1, 1, 9, 4), 'bias': (4,)}),
    'NFNet/~/linear': ('head', {'w': (4, 3), 'b': (3,)}),
}


def _stats_problem(seed):
  """params, grads with G_i = c_i W_i per unit, so unit i is clipped iff
  c_i > LAM, with factor LAM / c_i; and the numpy-counted expectation
  {group: (units, clipped, factor_sum)} ('' = overall) for AGC masked off
  the classifier weight."""
  rng = np.random.default_rng(seed)
  params, grads, expect = {}, {}, {}
  for module, (group, leaves) in STATS_TREE.items():
    params[module], grads[module] = {}, {}
    for name, shape in leaves.items():
      w = rng.uniform(0.5, 1.5, shape).astype(np.float32)
      units = shape[-1] if len(shape) >= 2 else 1
      c = rng.choice([0.02, 0.05, 0.3, 0.5, 2.0], units).astype(np.float32)
      params[module][name] = w
      grads[module][name] = (w * c if len(shape) >= 2 else w * c[0])
      if module == 'NFNet/~/linear' and name == 'w':
        continue  # agc_mask: the classifier weight is not clipped
      clipped = c > LAM
      factor = np.where(clipped, LAM / c, 1.0)
      for key in ('', group):
        u, k, f = expect.get(key, (0, 0, 0.0))
        expect[key] = (u + units, k + clipped.sum(), f + factor.sum())
  return params, grads, expect


def _check_stats(stats, expect):
  assert set(stats) == ({'agc/clipped_frac', 'agc/clip_factor'}
                        | {f'agc/{k}/{g}' for g in expect if g
                           for k in ('clipped_frac', 'clip_factor')})
  for group, (units, clipped, fsum) in expect.items():
    suffix = f'/{group}' if group else ''
    assert stats['agc/clipped_frac' + suffix] == (  # exact counts
        np.float32(clipped) / np.float32(units))
    np.testing.assert_allclose(float(stats['agc/clip_factor' + suffix]),
                               fsum / units, rtol=1e-5)


def test_stats_exact_on_hand_made_tree():
  params, grads, expect = _stats_problem(0)
  tx = optax.masked(adaptive_grad_clip(LAM), agc_mask)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  _check_stats(nfo.agc_statistics(state, params), expect)
  # Groups from the stats' own paths give the same answer.
  _check_stats(nfo.agc_statistics(state), expect)
  # Per leaf: units and clipped counts of the stem kernel (4 units).
  stem = state.inner_state.clipped['NFNet/~/stem_conv0']['w']
  c = grads['NFNet/~/stem_conv0']['w'][0, 0, 0] / params[
      'NFNet/~/stem_conv0']['w'][0, 0, 0]
  assert float(stem) == float(np.sum(c > LAM))


def test_stats_survive_optax_wrappers():
  params, grads, expect = _stats_problem(1)
  agc = lambda: optax.masked(adaptive_grad_clip(LAM), agc_mask)
  txs = {
      'chain': optax.chain(agc(), optax.add_decayed_weights(1e-4),
                           optax.sgd(0.1, momentum=0.9)),
      'inject_hyperparams': optax.chain(optax.masked(
          optax.inject_hyperparams(adaptive_grad_clip)(
              clipping=LAM, unit_axes=None), agc_mask), optax.sgd(0.1)),
      'MultiSteps': optax.MultiSteps(optax.chain(agc(), optax.sgd(0.1)), 2),
  }
  for name, tx in txs.items():
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(grads, state, params)
    if name == 'MultiSteps':  # inner update runs on the 2nd micro-step
      assert float(nfo.agc_statistics(state)['agc/clipped_frac']) == 0.0
      _, state = update(grads, state, params)
    assert len(nfo.agc_states(state)) == 1, name
    _check_stats(nfo.agc_statistics(state, params), expect)


def test_stats_absent_raises_clearly():
  params, _, _ = _stats_problem(0)
  tx = optax.chain(adaptive_grad_clip(LAM, stats=False), optax.sgd(0.1))
  with pytest.raises(ValueError, match='stats=False'):
    nfo.agc_statistics(tx.init(params))


def test_int_unit_axes_under_inject_hyperparams():
  params = {'w': jnp.ones((3, 2))}
  grads = {'w': jnp.full((3, 2), 10.0)}
  direct = adaptive_grad_clip(0.01, unit_axes=0).update(grads, None, params)[0]
  # A tuple stays static under inject_hyperparams; so does a static int.
  for tx in (optax.inject_hyperparams(adaptive_grad_clip)(0.01, unit_axes=(0,)),
             optax.inject_hyperparams(adaptive_grad_clip, static_args=(
                 'unit_axes',))(0.01, unit_axes=0)):
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert_tree_close(out, direct)
  tx = optax.inject_hyperparams(adaptive_grad_clip)(0.01, unit_axes=0)
  with pytest.raises(TypeError, match=r"unit_axes=\(0,\).*static_args"):
    tx.init(params)


@pytest.mark.parametrize('name', ['F0', 'nf_resnet50', 'nf_regnet_b0'])
def test_param_groups_match_depths(name):
  import nfnets.models as M
  shapes = M.param_shapes(name, 10)
  from_paths = nfo.param_groups(shapes)
  from_depths = nfo.param_groups(shapes, depths=M.get_variant(name).depth)
  assert from_paths == from_depths
  labels = set(jax.tree.leaves(from_paths))
  assert labels == set(nfo.AGC_GROUPS)
  # Every block's params sit in one stage; stage sizes are the depths.
  flat = {m: g for m, leaves in from_paths.items() for g in leaves.values()}
  blocks = {m.split('/~/')[1] for m in flat if '_block' in m}
  per_stage = [sum(1 for b in blocks
                   if flat[[m for m in flat if m.split('/~/')[1] == b][0]]
                   == f'stage{s}') for s in (1, 2, 3, 4)]
  assert per_stage == list(M.get_variant(name).depth)


class _StatsNet(hk.Module):
  """Stem, one block, classifier, with NFNet's module names."""

  def __call__(self, x, is_training):
    del is_training
    h = jax.nn.relu(hk.Linear(6, name='stem_conv0')(x))
    h = h + jax.nn.relu(hk.Linear(6, name='nf_block')(h))
    return {'logits': hk.Linear(3, name='linear')(h)}


def test_train_step_reports_agc_metrics():
  from nfnets.training import state as state_lib
  from nfnets.training import step as step_lib
  from nfnets.training.parallel import AXIS
  fwd = hk.transform(lambda x, t: _StatsNet(name='NFNet')(x, t))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(8, 4)).astype(np.float32)
  labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
  params = fwd.init(jax.random.PRNGKey(0), images, True)
  tx = optax.chain(optax.masked(adaptive_grad_clip(0.01), agc_mask),
                   optax.sgd(0.1))
  state = state_lib.create(params, tx)
  # Reference: the same gradients through tx by hand.
  grads = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy(
      fwd.apply(p, None, images, True)['logits'], labels)))(params)
  expect = jax.jit(lambda g, p: nfo.agc_statistics(
      tx.update(g, tx.init(p), p)[1], p))(grads, params)
  assert {'agc/clipped_frac/stem', 'agc/clipped_frac/stage1',
          'agc/clipped_frac/head'} <= set(expect)
  batch = {'images': images[None], 'labels': labels[None]}
  for on in (True, False):
    step = jax.jit(jax.vmap(step_lib.make_train_step(
        fwd, tx, ema_decay=0.0, agc_stats=on), in_axes=(None, 0, None),
                            axis_name=AXIS))
    _, metrics = step(state, batch, jax.random.PRNGKey(1))
    agc = {k: float(v[0]) for k, v in metrics.items() if k.startswith('agc/')}
    if on:
      assert agc.keys() == expect.keys()
      for k, v in expect.items():
        np.testing.assert_allclose(agc[k], float(v), rtol=1e-6, err_msg=k)
    else:
      assert agc == {}
