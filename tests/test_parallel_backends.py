"""The device seam (nfnets.training.parallel): 'jit' (+ FSDP) against 'pmap'
on 8 fake CPU devices, tiny models, a few steps."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import nfnets.models as M
from nfnets import optim
from nfnets.training import parallel
from nfnets.training import parallel_jit
from nfnets.training import setup as setup_lib
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib

# The model, data and optimizer of tests/test_fsdp.py (which runs first): the
# same compiled 'jit' step, served by the session's persistent compilation
# cache. Stochastic depth and dropout on: the per-device rngs must match.
_TINY = dict(width=0.0625, depth=(1, 1, 1, 1), group_size=8, drop_rate=0.2,
             stochdepth_rate=0.1)
_BATCH, _CLASSES, _SIZE, _STEPS = 16, 16, 16, 3


def _dp(backend, fsdp=False, min_shard_size=None, **kwargs):
  if min_shard_size is not None:  # FSDP of a tiny model's small leaves
    return parallel_jit.Jit(fsdp=fsdp, min_shard_size=min_shard_size)
  return parallel.make(ml_collections.ConfigDict(
      dict(backend=backend, fsdp=fsdp)), **kwargs)


@functools.lru_cache(maxsize=None)
def _setup(classes=_CLASSES, width=_TINY['width']):
  fwd = M.forward_fn('F0', num_classes=classes, **dict(_TINY, width=width))
  rng = np.random.RandomState(0)
  images = rng.randn(_STEPS, _BATCH, _SIZE, _SIZE, 3).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[
      rng.randint(0, classes, (_STEPS, _BATCH))]
  params = M.init_params(fwd, jax.random.PRNGKey(0),
                         jnp.asarray(images[0, :1]))
  cfg = optim.default_optim_config()  # AGC, weight decay, Nesterov momentum
  cfg.warmup_epochs = 0.0
  cfg.ema_decay = 0.9  # an EMA that visibly moves in 3 steps
  cfg.agc_clipping = 0.005  # small enough that AGC clips some units
  tx, _ = optim.make_optimizer(cfg, batch_size=_BATCH, steps_per_epoch=10,
                               total_steps=100)
  train = step_lib.make_train_step(fwd, tx, ema_decay=cfg.ema_decay,
                                   grad_accum_steps=2, agc_stats=True)
  return fwd, tx, params, images, labels, train


def _train(dp, steps=_STEPS):
  """`steps` steps through the seam; (host state, per-step losses, device
  state)."""
  _, tx, params, images, labels, train = _setup()
  state = dp.put_state(state_lib.create(params, tx))
  step = dp.train_step(train)
  rng = np.asarray(jax.random.PRNGKey(1))
  host_batches = ({'images': images[i], 'labels': labels[i]}
                  for i in range(steps))
  losses = []
  for batch in dp.put_batch(host_batches, size=2):
    state, metrics = step(state, batch, rng)
    losses.append(float(dp.fetch(metrics)['loss']))
  return dp.get_state(state), losses, state


@functools.lru_cache(maxsize=None)
def _reference():
  return _train(_dp('pmap'))[:2]


def _assert_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


def test_jit_equals_pmap_after_three_steps():
  (ref, ref_losses), params = _reference(), _setup()[2]
  got, losses, dev_state = _train(_dp('jit'))
  assert int(got.step) == int(ref.step) == _STEPS
  assert int(got.nonfinite) == 0
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref.ema_params,
                       params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the EMA did move
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_close(got.params, ref.params)
  _assert_close(got.ema_params, ref.ema_params)
  _assert_close(got.opt_state, ref.opt_state)
  # 'jit' keeps one replicated global array per leaf over all 8 devices.
  leaf = jax.tree.leaves(dev_state.params)[0]
  assert leaf.shape == jax.tree.leaves(ref.params)[0].shape
  assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated


def test_fsdp_state_bytes_per_device():
  """A model whose state is mostly in leaves with an axis divisible by 8:
  each device holds at most 1/8 (+5%) of the replicated state's bytes."""
  _, tx, params, _, _, _ = _setup(classes=1000, width=0.5)
  host = state_lib.create(params, tx)
  replicated = _dp('jit').put_state(host)
  sharded = _dp('jit', fsdp=True).put_state(host)
  full = parallel.DataParallel.bytes_per_device(replicated)
  assert full == sum(np.asarray(x).nbytes for x in jax.tree.leaves(host))
  per_device = parallel.DataParallel.bytes_per_device(sharded)
  assert per_device <= full * (1 / 8 + 0.05), (per_device, full)
  jax.tree.map(np.testing.assert_array_equal,
               _dp('jit', fsdp=True).get_state(sharded), host)


def test_eval_step_sums_over_devices_like_pmap():
  fwd, _, params, images, _, _ = _setup()
  ids = np.arange(_BATCH) % _CLASSES
  mask = (np.arange(_BATCH) < 11).astype(np.float32)
  batch = {'images': images[0], 'labels': ids.astype(np.int32), 'mask': mask}
  sums = {}
  for backend in ('pmap', 'jit', 'fsdp'):
    dp = _dp('jit', fsdp=True, min_shard_size=256) if backend == 'fsdp' \
        else _dp(backend)
    totals = setup_lib.evaluate(dp, dp.eval_step(step_lib.make_eval_step(fwd)),
                                dp.put_state(params), [batch, batch])
    sums[backend] = totals
  logits = np.asarray(jax.jit(  # one compile, not op by op
      lambda p, x: fwd.apply(p, None, x, False)['logits'])(params, images[0]))
  top1 = 2 * float(((logits.argmax(-1) == ids) * mask).sum())
  for backend in ('jit', 'fsdp'):  # fsdp: gathered per layer
    assert sums[backend]['count'] == sums['pmap']['count'] == 22.0
    assert sums[backend]['top1'] == sums['pmap']['top1'] == top1
    np.testing.assert_allclose(sums[backend]['loss'], sums['pmap']['loss'],
                               rtol=1e-5)


def test_fsdp_sharding_rule():
  """The stored layout is fsdp.unit_axis_spec (tests/test_fsdp.py)."""
  dp = _dp('jit', fsdp=True)
  assert dp.spec((3, 3, 64, 128)) == jax.sharding.PartitionSpec(
      None, None, None, 'batch')  # the output (unit) axis
  assert dp.spec((2048, 1000)) == jax.sharding.PartitionSpec(None, 'batch')
  assert dp.spec((128,)) == jax.sharding.PartitionSpec()  # small: replicated
  assert dp.spec((127, 129)) == jax.sharding.PartitionSpec()  # indivisible
  assert _dp('jit').spec((3, 3, 64, 128)) == jax.sharding.PartitionSpec()


def test_bad_backend_names_the_field():
  with pytest.raises(ValueError, match='config.parallel.backend'):
    _dp('pjit')
  with pytest.raises(ValueError, match="needs backend 'jit'"):
    _dp('pmap', fsdp=True)
