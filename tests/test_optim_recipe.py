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
  assert c.lr == 0.1 and c.lr_scaling == 'linear' and c.warmup_epochs == 5
  assert c.momentum == 0.9 and c.cosine_end_lr == 0.0 and c.use_agc
  assert c.nesterov and c.weight_decay == 2e-5 and c.agc_clipping == 0.01
  assert c.agc_eps == 1e-3 and c.ema_decay == 0.99999 and c.sam_rho == 0.0
  c.lock()
  c.agc_clipping = 0.05  # accepts a float ...
  c.agc_clipping = 'by_batch'  # ... or the table's name
  p = default_optim_config(family_placeholders=True)
  assert all(p[k] is None for k in nfo.FAMILY_FIELDS)
  with pytest.raises(ValueError, match='optim.lr.*resolve'):
    make_optimizer(p, batch_size=256, steps_per_epoch=10, total_steps=100)


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
      # The release clips the classifier's bias, not its weight.
      skip = (k, n) == ('NFNet/~/linear', 'w')
      expect = g if skip else np_agc_leaf(g, w, 0.01)
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
  make = lambda **kw: make_optimizer(cfg_with(**base, **kw), batch_size=1024,
                                     steps_per_epoch=10, total_steps=100)
  tx_default, lr = make()
  tx_table, _ = make(agc_clipping='by_batch')
  tx_over, _ = make(agc_clipping=0.3)
  lr0 = float(lr(0))
  w = params['NFNet/~/stem_conv0']['w']
  g = grads['NFNet/~/stem_conv0']['w']
  for tx, c in ((tx_default, 0.01), (tx_table, 0.04), (tx_over, 0.3)):
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
        if (k, n) != ('NFNet/~/linear', 'w'):  # the classifier bias is clipped
          g = np_agc_leaf(g, w, 0.01)
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
# Schedule lengths and values as in DeepMind's release.

IMAGENET_TRAIN = 1_281_167


def release_lr(itr, max_val, num_steps, warmup_steps, min_val=0.0):
  """The release's optim.WarmupCosineDecay (start_val 0), in float64."""
  warmup_val = max_val * itr / warmup_steps
  cos_itr = (itr - warmup_steps) / (num_steps - warmup_steps)
  cos_val = 0.5 * (max_val - min_val) * (1 + math.cos(math.pi * cos_itr))
  cos_val += min_val
  return cos_val if warmup_steps < itr else warmup_val


def test_training_steps_as_release():
  total, per_epoch = nfo.training_steps(IMAGENET_TRAIN, 4096, 360)
  # experiment_nfnets.py: (images_per_epoch * num_epochs) // batch
  assert total == (IMAGENET_TRAIN * 360) // 4096 == 112_602
  assert per_epoch == IMAGENET_TRAIN / 4096
  # not rounded per epoch first (that gave 312 * 360 = 112,320)
  assert total != (IMAGENET_TRAIN // 4096) * 360
  assert nfo.training_steps(IMAGENET_TRAIN, 1024, 360).total_steps == 450_410
  assert nfo.training_steps(1797, 64, 2.5) == (70, 1797 / 64)
  assert nfo.training_steps(1797, 64, 30.0, num_steps=7) == (7, 1797 / 64)
  with pytest.raises(ValueError, match='less than one step'):
    nfo.training_steps(100, 64, 0.5)
  with pytest.raises(ValueError, match='num_epochs'):
    nfo.training_steps(100, 64, 0)


@pytest.mark.parametrize('family', ['nfnet', 'nf_regnet'])
def test_lr_matches_release_schedule(family):
  if family == 'nfnet':  # experiment_nfnets.py: 0.1 x 4096 / 256, min 0
    batch, cfg, peak, floor = 4096, cfg_with(), 1.6, 0.0
  else:  # experiment_nf_regnets.py: 0.4 unscaled, min_val 0.001
    batch, peak, floor = 1024, 0.4, 0.001
    cfg = cfg_with(lr=0.4, lr_scaling='none', cosine_end_lr=0.001,
                   use_agc=False, weight_decay=5e-5)
  total, per_epoch = nfo.training_steps(IMAGENET_TRAIN, batch, 360)
  _, lr = make_optimizer(cfg, batch_size=batch, steps_per_epoch=per_epoch,
                         total_steps=total)
  warmup = 5 * IMAGENET_TRAIN / batch  # a float: 1563.92 steps for F0
  assert warmup != int(warmup)
  w = int(warmup)
  for step in (0, 1, 17, w - 1, w, w + 1, w + 2, total // 3, total // 2,
               total - 100, total - 1):
    expect = release_lr(step, peak, total, warmup, floor)
    assert float(lr(step)) == pytest.approx(expect, rel=2e-5, abs=1e-7), step
  assert float(lr(total)) == pytest.approx(floor, abs=1e-7)


def test_agc_clipping_values():
  assert nfo.agc_clipping_value(0.02, 64) == 0.02
  assert nfo.agc_clipping_value('by_batch', 64) == 0.08
  assert nfo.agc_clipping_value('by_batch', 4096) == 0.01
  for bad in ('by_bach', -0.1, 0.0, True, None):
    with pytest.raises(ValueError, match='agc_clipping'):
      nfo.agc_clipping_value(bad, 64)


def test_freeze_body_zero_updates_and_no_body_state():
  params = haiku_like_tree(3)
  rng = np.random.default_rng(4)
  grads = jax.tree.map(
      lambda p: rng.standard_normal(np.shape(p)).astype(np.float32), params)
  cfg = cfg_with(warmup_epochs=0)
  kw = dict(batch_size=256, steps_per_epoch=10, total_steps=100)
  tx_frozen, _ = make_optimizer(cfg, freeze_body=True, **kw)
  tx_full, _ = make_optimizer(cfg, **kw)
  state = tx_frozen.init(params)
  # Optimizer state (the momentum trace) exists for the classifier only.
  state_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state)
                        if np.ndim(x) > 0)
  classifier = params['NFNet/~/linear']
  assert state_shapes == sorted(np.shape(v) for v in classifier.values())
  u_frozen, state = tx_frozen.update(grads, state, params)
  u_full, _ = tx_full.update(grads, tx_full.init(params), params)
  for k in params:
    for n in params[k]:
      if k == 'NFNet/~/linear':  # the classifier: the normal recipe's update
        np.testing.assert_allclose(u_frozen[k][n], u_full[k][n], rtol=1e-6)
        assert np.any(np.asarray(u_frozen[k][n]) != 0)
      else:
        np.testing.assert_array_equal(u_frozen[k][n], 0.0, err_msg=f'{k}/{n}')
  # a second step keeps working (state round-trips)
  tx_frozen.update(grads, state, params)
  with pytest.raises(ValueError, match='classifier_regex'):
    make_optimizer(cfg_with(classifier_regex=None), freeze_body=True,
                   **kw)[0].init(params)
  with pytest.raises(ValueError, match='matches no leaf'):
    make_optimizer(cfg_with(classifier_regex='^nothing$'), freeze_body=True,
                   **kw)[0].init(params)


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


def test_one_classifier_definition():
  """The module-path and param-path forms agree; AGC skips only weights."""
  for root in ('NFNet', 'NF_ResNet', 'NF_RegNet', 'NFResNet'):
    assert nfo.is_classifier_module(f'{root}/~/linear')
    for leaf in ('w', 'b'):
      assert nfo.is_classifier(f'{root}/~/linear/{leaf}')
    assert nfo.is_agc_excluded(f'{root}/~/linear/w')
    assert not nfo.is_agc_excluded(f'{root}/~/linear/b')
  for other in ('NFNet/~/nf_block/~/squeeze_excite/~/linear',
                'NFNet/~/linear_1', 'NFNet/~/final_conv'):
    assert not nfo.is_classifier_module(other)
    assert not nfo.is_classifier(other + '/w')
    assert not nfo.is_agc_excluded(other + '/w')
  assert nfo.CLASSIFIER_REGEX.startswith(nfo.CLASSIFIER_MODULE_REGEX[:-1])
