"""Tests for the NFNet optimizer recipe, EMA and SAM (nfnets.optim)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nfnets.optim as nfo
from nfnets.optim import (default_optim_config, ema_decay, ema_update,
                          make_optimizer, sam_gradients)


def haiku_like_tree(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {
      'NFNet/~/stem_conv0': {'w': f(3, 3, 3, 4), 'gain': 1 + f(4) * 0.1,
                             'bias': f(4) * 0.1},
      'NFNet/~/nf_block': {'skip_gain': np.float32(0.3)},
      'NFNet/~/nf_block/~/squeeze_excite/~/linear': {'w': f(4, 2),
                                                     'b': f(2) * 0.1},
      'NFNet/~/linear': {'w': f(4, 3) * 0.01, 'b': np.zeros(3, np.float32)},
  }


def cfg_with(**kw):
  c = default_optim_config()
  for k, v in kw.items():
    c[k] = v
  return c


def np_agc_leaf(g, w, clipping, eps=1e-3):
  g = np.asarray(g, np.float64)
  w = np.asarray(w, np.float64)
  axes = None if g.ndim <= 1 else tuple(range(g.ndim - 1))
  gn = np.sqrt(np.sum(g ** 2, axis=axes, keepdims=True))
  wn = np.maximum(np.sqrt(np.sum(w ** 2, axis=axes, keepdims=True)), eps)
  return np.where(gn > clipping * wn, g * clipping * wn / np.maximum(gn, 1e-6),
                  g)


def test_default_config():
  c = default_optim_config()
  assert c.lr_per_256 == 0.1 and c.warmup_epochs == 5 and c.momentum == 0.9
  assert c.nesterov and c.weight_decay == 2e-5 and c.agc_clipping is None
  assert c.agc_eps == 1e-3 and c.ema_decay == 0.99999 and c.sam_rho == 0.0
  c.agc_clipping = 0.05  # placeholder accepts a float


def test_clipping_table():
  f = nfo.agc_clipping_for_batch_size
  assert [f(b) for b in (8, 256, 512, 513, 1024, 2048, 3000, 4096, 65536)] == [
      0.08, 0.08, 0.08, 0.04, 0.04, 0.02, 0.01, 0.01, 0.01]
  with pytest.raises(ValueError):
    f(0)


def test_lr_schedule_key_steps():
  _, lr = make_optimizer(None, batch_size=512, steps_per_epoch=10,
                         total_steps=100)
  peak = 0.1 * 512 / 256
  expect = {0: 0.0, 25: peak / 2, 49: peak * 49 / 50, 50: peak, 75: peak / 2,
            100: 0.0, 150: 0.0}
  for step, v in expect.items():
    assert float(lr(step)) == pytest.approx(v, abs=1e-6), step
  assert float(lr(60)) == pytest.approx(
      0.5 * peak * (1 + math.cos(math.pi * 10 / 50)), rel=1e-6)
  assert float(jax.jit(lr)(jnp.int32(75))) == pytest.approx(peak / 2, abs=1e-6)


def test_tx_follows_lr_schedule():
  cfg = cfg_with(momentum=0.0, weight_decay=0.0, use_agc=False)
  tx, lr = make_optimizer(cfg, batch_size=256, steps_per_epoch=2,
                          total_steps=20)
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(13):
    u, state = step({'w': jnp.ones((2, 2))}, state, params)
    np.testing.assert_allclose(u['w'], -float(lr(t)), rtol=1e-6, atol=1e-7)


def test_weight_decay_not_on_gains_biases():
  params = haiku_like_tree()
  zeros = jax.tree.map(np.zeros_like, params)
  cfg = cfg_with(warmup_epochs=0, weight_decay=1e-2)
  tx, lr = make_optimizer(cfg, batch_size=256, steps_per_epoch=10,
                          total_steps=100)
  u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  lr0 = float(lr(0))
  assert lr0 == pytest.approx(0.1)
  paths = nfo.tree_paths(params)
  for path, w, du in zip(jax.tree.leaves(paths), jax.tree.leaves(params),
                         jax.tree.leaves(u)):
    if np.ndim(w) >= 2:  # weights, classifier kernel included (as released)
      # nesterov, first step: m = g; step = g + 0.9 m = 1.9 g
      np.testing.assert_allclose(du, -lr0 * 1.9 * 1e-2 * w, rtol=1e-5,
                                 err_msg=path)
    else:  # gains, biases, skip_gain
      np.testing.assert_array_equal(du, 0.0, err_msg=path)


def test_agc_not_on_classifier():
  params = haiku_like_tree(1)
  rng = np.random.default_rng(5)
  grads = jax.tree.map(
      lambda p: (rng.standard_normal(np.shape(p)) * 100).astype(np.float32),
      params)
  cfg = cfg_with(warmup_epochs=0, weight_decay=0.0, momentum=0.0)
  tx, lr = make_optimizer(cfg, batch_size=4096, steps_per_epoch=10,
                          total_steps=100)
  u, _ = tx.update(grads, tx.init(params), params)
  lr0 = float(lr(0))
  for k in params:
    for n in params[k]:
      g, w = grads[k][n], params[k][n]
      expect = g if k == 'NFNet/~/linear' else np_agc_leaf(g, w, 0.01)
      np.testing.assert_allclose(u[k][n], -lr0 * expect, rtol=1e-5,
                                 err_msg=f'{k}/{n}')
  # the classifier was above threshold, so excluding it mattered
  assert not np.allclose(np_agc_leaf(grads['NFNet/~/linear']['w'],
                                     params['NFNet/~/linear']['w'], 0.01),
                         grads['NFNet/~/linear']['w'])


def test_agc_clipping_override():
  params = haiku_like_tree(2)
  grads = jax.tree.map(lambda p: np.full(np.shape(p), 5.0, np.float32), params)
  base = dict(warmup_epochs=0, weight_decay=0.0, momentum=0.0)
  tx_table, lr = make_optimizer(cfg_with(**base), batch_size=1024,
                                steps_per_epoch=10, total_steps=100)
  tx_over, _ = make_optimizer(cfg_with(agc_clipping=0.3, **base),
                              batch_size=1024, steps_per_epoch=10,
                              total_steps=100)
  lr0 = float(lr(0))
  w = params['NFNet/~/stem_conv0']['w']
  g = grads['NFNet/~/stem_conv0']['w']
  for tx, c in ((tx_table, 0.04), (tx_over, 0.3)):
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u['NFNet/~/stem_conv0']['w'],
                               -lr0 * np_agc_leaf(g, w, c), rtol=1e-5)


def test_nesterov_two_steps_hand_computed():
  params = haiku_like_tree(3)
  rng = np.random.default_rng(9)
  grads = [jax.tree.map(
      lambda p: (rng.standard_normal(np.shape(p)) * s).astype(np.float32),
      params) for s in (1.0, 0.01)]
  cfg = cfg_with(warmup_epochs=0.1, weight_decay=1e-3)  # warmup = 1 step
  tx, lr = make_optimizer(cfg, batch_size=2048, steps_per_epoch=10,
                          total_steps=4)
  state = tx.init(params)
  p = params
  step = jax.jit(tx.update)
  # numpy reference, float64
  ref_p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  ref_m = jax.tree.map(np.zeros_like, ref_p)
  lrs = [0.0, 0.1 * 2048 / 256]  # warmup step 0 -> 0; step 1 = peak
  for t in range(2):
    u, state = step(grads[t], state, p)
    p = optax.apply_updates(p, u)
    new_p, new_m = {}, {}
    for k in ref_p:
      new_p[k], new_m[k] = {}, {}
      for n in ref_p[k]:
        w, g = ref_p[k][n], np.asarray(grads[t][k][n], np.float64)
        if k != 'NFNet/~/linear':
          g = np_agc_leaf(g, w, 0.02)
        if np.ndim(w) >= 2:
          g = g + 1e-3 * w
        m = 0.9 * ref_m[k][n] + g
        new_m[k][n] = m
        new_p[k][n] = w - lrs[t] * (g + 0.9 * m)
    ref_p, ref_m = new_p, new_m
    assert float(lr(t)) == pytest.approx(lrs[t])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), p, ref_p)


def test_recipe_traces_on_real_f0_tree():
  models = pytest.importorskip('nfnets.models')
  shapes = models.param_shapes('F0')
  tx, _ = make_optimizer(None, batch_size=4096, steps_per_epoch=312,
                         total_steps=312 * 360)
  state = jax.eval_shape(tx.init, shapes)
  out, _ = jax.eval_shape(tx.update, shapes, state, shapes)
  jax.tree.map(lambda a, b: a.shape == b.shape or pytest.fail('shape'),
               out, shapes)


def test_bad_arguments():
  with pytest.raises(ValueError, match='warmup'):
    make_optimizer(None, batch_size=256, steps_per_epoch=10, total_steps=50)
  with pytest.raises(ValueError, match='positive'):
    make_optimizer(None, batch_size=0, steps_per_epoch=10, total_steps=50)


# ------------------------------------------------------------------------------
# EMA.


def test_ema_decay_formula():
  for step in (0, 1, 8, 80, 890, 10**6, 10**7):
    assert float(ema_decay(step)) == pytest.approx(
        min(0.99999, (1 + step) / (10 + step)), rel=1e-6)
  assert float(ema_decay(0)) == pytest.approx(0.1)
  assert float(ema_decay(8)) == pytest.approx(0.5)
  assert float(ema_decay(10**7, max_decay=0.999)) == pytest.approx(0.999)


def test_ema_update():
  ema = {'a': jnp.ones((2,)), 'b': jnp.zeros((), jnp.bfloat16),
         'n': jnp.int32(3)}
  params = {'a': jnp.full((2,), 3.0), 'b': jnp.ones((), jnp.bfloat16),
            'n': jnp.int32(7)}
  out = jax.jit(ema_update)(ema, params, jnp.int32(8))  # decay 0.5
  np.testing.assert_allclose(out['a'], 2.0, rtol=1e-6)
  assert out['b'].dtype == jnp.bfloat16
  assert float(out['b']) == pytest.approx(0.5)
  assert int(out['n']) == 7
  out = ema_update(ema, params, 10**9, max_decay=0.9)
  np.testing.assert_allclose(out['a'], 0.9 * 1 + 0.1 * 3, rtol=1e-6)


# ------------------------------------------------------------------------------
# SAM.


def _quad(a):
  return lambda w, scale=1.0: 0.5 * scale * jnp.sum(a * w['x'] ** 2)


def test_sam_on_quadratic():
  a = jnp.array([1.0, 4.0, 9.0])
  w = {'x': jnp.array([1.0, -2.0, 0.5])}
  rho = 0.05
  loss, g = sam_gradients(_quad(a), w, rho)
  g0 = np.asarray(a * w['x'])
  e = rho * g0 / np.linalg.norm(g0)
  np.testing.assert_allclose(g['x'], np.asarray(a) * (np.asarray(w['x']) + e),
                             rtol=1e-6)
  assert float(loss) == pytest.approx(float(_quad(a)(w)))
  # rho = 0 -> plain gradient; kwargs and has_aux pass through
  _, g = sam_gradients(_quad(a), w, 0.0, scale=2.0)
  np.testing.assert_allclose(g['x'], 2 * g0, rtol=1e-6)
  (l, aux), g = jax.jit(lambda w: sam_gradients(
      lambda w: (_quad(a)(w), {'aux': 1.0}), w, rho, has_aux=True))(w)
  assert float(aux['aux']) == 1.0
  # zero gradient: no NaN
  _, g = sam_gradients(_quad(a), {'x': jnp.zeros(3)}, rho)
  np.testing.assert_array_equal(g['x'], 0.0)


def test_sam_pmean_ascent_on_devices():
  n = jax.local_device_count()
  if n < 2:
    pytest.skip('needs several devices')
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(0.5, 2.0, (n, 3)), jnp.float32)
  w = np.array([1.0, -1.0, 2.0], np.float32)
  rho = 0.1

  def step(a_d, w):
    return sam_gradients(lambda w, a: 0.5 * jnp.sum(a * w['x'] ** 2),
                         {'x': w}, rho, a_d, axis_name='i')[1]['x']

  g = jax.pmap(step, axis_name='i')(a, np.broadcast_to(w, (n, 3)))
  gbar = np.asarray(a).mean(0) * w
  e = rho * gbar / np.linalg.norm(gbar)
  np.testing.assert_allclose(g, np.asarray(a) * (w + e), rtol=1e-5)
