"""Gradient accumulation in make_train_step: k micro-batches of B/k equal one
step at batch B, and AGC / momentum / EMA act once on the accumulated
gradient."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nfnets.models as M
from nfnets import optim
from nfnets.training import parallel
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib

_TINY = dict(width=0.0625, depth=(1, 1, 1, 1), group_size=8, drop_rate=0.0,
             stochdepth_rate=0.0)


def _data(batch, classes, size, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.randn(batch, size, size, 3).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[rng.randint(0, classes, batch)]
  return images, labels


def _tx(batch, clipping=None):
  cfg = optim.default_optim_config()
  cfg.warmup_epochs = 0.0
  if clipping is not None:
    cfg.agc_clipping = clipping
  tx, _ = optim.make_optimizer(cfg, batch_size=batch, steps_per_epoch=10,
                               total_steps=100)
  return tx


def _run(fwd, tx, params, images, labels, k, steps=2):
  dp = parallel.Pmap(devices=jax.local_devices()[:1])  # one device
  p_step = dp.train_step(step_lib.make_train_step(
      fwd, tx, grad_accum_steps=k, ema_decay=0.9))
  state = dp.put_state(state_lib.create(params, tx))
  batch = dp.put_batch_now({'images': images, 'labels': labels})
  for _ in range(steps):
    state, metrics = p_step(state, batch, jax.random.PRNGKey(1))
  return dp.get_state(state), dp.fetch(metrics)


def _close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


def test_accumulating_k_micro_batches_equals_one_full_batch_step():
  fwd = M.forward_fn('F0', num_classes=5, **_TINY)
  images, labels = _data(16, 5, 16)
  params = M.init_params(fwd, jax.random.PRNGKey(0), jnp.asarray(images[:1]))
  tx = _tx(16)
  full, m_full = _run(fwd, tx, params, images, labels, k=1)
  acc, m_acc = _run(fwd, tx, params, images, labels, k=4)
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.abs(a - b).max(), full.params, params)))
  assert moved > 1e-4  # the steps changed the params
  _close(acc.params, full.params)
  _close(acc.ema_params, full.ema_params)
  _close(acc.opt_state, full.opt_state)
  for key in ('loss', 'top1', 'grad_norm'):
    np.testing.assert_allclose(m_acc[key], m_full[key], rtol=1e-5)


class _Toy(hk.Module):
  """A hidden layer 'toy/~/fc' (clipped by AGC) and a classifier
  'toy/~/linear' (not clipped)."""

  def __init__(self):
    super().__init__(name='toy')
    self.fc = hk.Linear(4, name='fc')
    self.linear = hk.Linear(3, name='linear')

  def __call__(self, images):
    hidden = jnp.tanh(self.fc(images.reshape(images.shape[0], -1)))
    return self.linear(hidden)


def _toy():
  return hk.transform(lambda images, is_training: {'logits': _Toy()(images)})


FC = 'toy/~/fc'


def test_agc_clips_the_accumulated_gradient_not_each_micro_batch():
  fwd = _toy()
  images, labels = _data(8, 3, 2, seed=3)
  images[:4] *= 50.0  # the first micro-batch has a much larger gradient
  params = M.init_params(fwd, jax.random.PRNGKey(0), images[:1])
  tx = _tx(8, clipping=0.01)  # AGC on 'toy/~/fc', not the classifier
  out, _ = _run(fwd, tx, params, images, labels, k=2, steps=1)

  def loss(p, x, y):
    logits = fwd.apply(p, None, x, True)['logits']
    return jnp.mean(optax.softmax_cross_entropy(logits, y))

  def update(grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  grad = jax.jit(jax.grad(loss))  # one compile per shape, not op by op
  mean_grad = grad(params, images, labels)
  expected = update(mean_grad)
  _close(out.params, expected, rtol=1e-5, atol=1e-6)
  # Clipping each micro-batch, then averaging, is a different update.
  agc = optim.adaptive_grad_clip(0.01)
  clipped = [agc.update(grad(params, images[i:i + 4], labels[i:i + 4]),
                        agc.init(params), params)[0] for i in (0, 4)]
  per_micro = update(jax.tree.map(lambda a, b: (a + b) / 2, *clipped))
  diff = np.abs(per_micro[FC]['w'] - expected[FC]['w']).max()
  assert diff > 1e-3 * np.abs(expected[FC]['w'] - params[FC]['w']).max()
  assert diff > 100 * np.abs(out.params[FC]['w'] - expected[FC]['w']).max()


def test_batch_not_divisible_by_k_is_a_clear_error():
  fwd = _toy()
  images, labels = _data(6, 3, 2)
  params = M.init_params(fwd, jax.random.PRNGKey(0), images[:1])
  with pytest.raises(ValueError, match=r'\(6 examples\) is not divisible by '
                     r'grad_accum_steps=4'):
    _run(fwd, _tx(6), params, images, labels, k=4, steps=1)
  with pytest.raises(ValueError, match='positive integer'):
    step_lib.make_train_step(fwd, _tx(6), grad_accum_steps=0)
