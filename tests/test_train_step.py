"""The pure train/eval steps under pmap on 8 fake CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nfnets.models as M
from nfnets import optim
from nfnets.training import parallel
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib

_TINY = dict(width=0.0625, depth=(1, 1, 1, 1), group_size=8, drop_rate=0.0,
             stochdepth_rate=0.0)


@functools.lru_cache(maxsize=None)
def _cached_setup(batch, classes):
  fwd = M.forward_fn('F0', num_classes=classes, **_TINY)
  rng = np.random.RandomState(0)
  images = rng.randn(batch, 16, 16, 3).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[rng.randint(0, classes, batch)]
  params = M.init_params(fwd, jax.random.PRNGKey(0), jnp.asarray(images[:1]))
  # Non-zero skip gains so that every layer gets a gradient.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 if 'skip_gain' in jax.tree_util.keystr(p) else v,
      params)
  cfg = optim.default_optim_config()
  cfg.warmup_epochs = 0.0  # full lr from the first step
  tx, _ = optim.make_optimizer(cfg, batch_size=batch, steps_per_epoch=10,
                               total_steps=100)
  return fwd, tx, params, images, labels


def _setup(batch=16, classes=5):
  """(forward, tx, params, images, labels); built once, copies of the arrays."""
  fwd, tx, params, images, labels = _cached_setup(batch, classes)
  return fwd, tx, params, images.copy(), labels.copy()


@functools.lru_cache(maxsize=None)
def _pmapped_step(fwd, tx, devices):
  # test_train_grad_accum's step for k=1 (same model, optimizer and EMA
  # decay): the persistent compilation cache serves the second of the two.
  dp = parallel.Pmap(list(devices))
  return dp, dp.train_step(step_lib.make_train_step(fwd, tx, ema_decay=0.9))


def _run(fwd, tx, params, images, labels, devices, steps=2):
  dp, p_step = _pmapped_step(fwd, tx, tuple(devices))
  state = dp.put_state(state_lib.create(params, tx))
  batch = dp.put_batch_now({'images': images, 'labels': labels})
  for _ in range(steps):
    state, metrics = p_step(state, batch, jax.random.PRNGKey(1))
  return dp.get_state(state), dp.fetch(metrics)


def test_eight_devices_equal_one_device_same_global_batch():
  fwd, tx, params, images, labels = _setup()
  devices = jax.local_devices()
  assert len(devices) == 8
  s8, m8 = _run(fwd, tx, params, images, labels, devices)
  s1, m1 = _run(fwd, tx, params, images, labels, devices[:1])
  assert int(s8.step) == int(s1.step) == 2
  np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
  changed = jax.tree.map(lambda a, b: np.abs(a - b).max(), s1.params, params)
  assert max(jax.tree.leaves(changed)) > 1e-4  # the step did something
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               s8.params, s1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               s8.ema_params, s1.ema_params)


def test_nonfinite_step_is_skipped_and_counted():
  fwd, tx, params, images, labels = _setup()
  images[3] = np.nan
  devices = jax.local_devices()[:1]
  state, metrics = _run(fwd, tx, params, images, labels, devices, steps=3)
  assert int(state.step) == 3 and int(state.nonfinite) == 3
  assert float(metrics['skipped']) == 1.0
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, params)


def _nan_grad_forward():
  """A linear classifier whose loss is finite but whose gradient w.r.t. one
  leaf ('b') is NaN: d/db (0 * sqrt(b)) at b = 0 is 0 * inf."""
  import haiku as hk

  def model(images, is_training):
    del is_training
    x = images.reshape(images.shape[0], -1)
    w = hk.get_parameter('w', (x.shape[-1], 5), init=jnp.ones)
    b = hk.get_parameter('b', (5,), init=jnp.zeros)
    return {'logits': x @ w * 1e-3 + 0.0 * jnp.sqrt(b)}
  return hk.transform(model)


def test_step_with_finite_loss_but_nan_gradient_is_skipped():
  fwd = _nan_grad_forward()
  _, _, _, images, labels = _setup()
  params = M.init_params(fwd, jax.random.PRNGKey(0), jnp.asarray(images[:1]))
  cfg = optim.default_optim_config()
  cfg.classifier_regex = None  # no classifier to exclude from AGC here
  tx = optim.make_optimizer(cfg, batch_size=16, steps_per_epoch=10,
                            total_steps=100)[0]
  loss_fn = lambda p: jnp.mean(optax.softmax_cross_entropy(
      fwd.apply(p, None, jnp.asarray(images), True)['logits'],
      jnp.asarray(labels)))
  assert np.isfinite(float(loss_fn(params)))
  assert np.isnan(np.asarray(jax.grad(loss_fn)(params)['~']['b'])).all()
  dp = parallel.Pmap(jax.local_devices()[:1])
  p_step = dp.train_step(step_lib.make_train_step(fwd, tx))
  state = dp.put_state(state_lib.create(params, tx))
  batch = dp.put_batch_now({'images': images, 'labels': labels})
  state, metrics = p_step(state, batch, jax.random.PRNGKey(1))
  state, metrics = dp.get_state(state), dp.fetch(metrics)
  assert int(state.step) == 1 and int(state.nonfinite) == 1
  assert float(metrics['skipped']) == 1.0
  jax.tree.map(np.testing.assert_array_equal, state.params, params)


def test_grad_and_param_norm_metrics():
  fwd, tx, params, images, labels = _setup()
  devices = jax.local_devices()[:1]
  state, metrics = _run(fwd, tx, params, images, labels, devices, steps=1)

  def loss_fn(p):
    logits = fwd.apply(p, jax.random.fold_in(jax.random.fold_in(
        jax.random.PRNGKey(1), 0), 0), jnp.asarray(images), True)['logits']
    return jnp.mean(optax.softmax_cross_entropy(logits, jnp.asarray(labels)))
  grads = jax.jit(jax.grad(loss_fn))(params)  # one compile, not op by op
  g = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                  for x in jax.tree.leaves(grads)))
  p = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                  for x in jax.tree.leaves(state.params)))
  np.testing.assert_allclose(float(metrics['grad_norm']), g, rtol=1e-4)
  np.testing.assert_allclose(float(metrics['param_norm']), p, rtol=1e-5)
  assert float(metrics['skipped']) == 0.0


def test_eval_step_counts_with_mask():
  fwd, _, params, images, _ = _setup()
  images = images[:8]
  ids = np.arange(8) % 5
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  dp = parallel.Pmap(jax.local_devices()[:2])
  p_eval = dp.eval_step(step_lib.make_eval_step(fwd))
  batch = dp.put_batch_now({'images': images, 'labels': ids, 'mask': mask})
  sums = dp.fetch(p_eval(dp.put_state(params), batch))
  logits = np.asarray(jax.jit(lambda p, x: fwd.apply(p, None, x, False))(
      params, jnp.asarray(images))['logits'])
  top1 = ((logits.argmax(-1) == ids) * mask).sum()
  top5 = mask.sum()  # 5 classes: every label is in the top 5
  assert float(sums['count']) == 5.0
  np.testing.assert_allclose(float(sums['top1']), top1)
  np.testing.assert_allclose(float(sums['top5']), top5)
