"""The device seam (nfnets.training.parallel): 'jit' (+ FSDP) against 'pmap'
on 8 fake CPU devices, tiny models, a few steps."""
import jax
import ml_collections
import numpy as np
import pytest

from nfnets.training import parallel
from nfnets.training import setup as setup_lib
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib

import tiny_steps

# tests/tiny_steps.py's model, data and step (shared with tests/test_fsdp.py,
# which runs first: its 'jit' run is the one compared here).
_BATCH, _CLASSES = tiny_steps.BATCH, tiny_steps.CLASSES


def _dp(backend, fsdp=False):
  return parallel.make(ml_collections.ConfigDict(
      dict(backend=backend, fsdp=fsdp)))


def _assert_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


def test_jit_equals_pmap_after_three_steps():
  ref, ref_metrics = tiny_steps.run('pmap')[:2]
  got, metrics, shardings, _ = tiny_steps.run('jit')
  params = tiny_steps.setup()[2]
  losses = [float(m['loss']) for m in metrics]
  ref_losses = [float(m['loss']) for m in ref_metrics]
  assert int(got.step) == int(ref.step) == tiny_steps.STEPS
  assert int(got.nonfinite) == 0
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref.ema_params,
                       params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the EMA did move
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_close(got.params, ref.params)
  _assert_close(got.ema_params, ref.ema_params)
  _assert_close(got.opt_state, ref.opt_state)
  # 'jit' keeps one replicated global array per leaf over all 8 devices.
  for sharding in jax.tree.leaves(shardings.params):
    assert len(sharding.device_set) == 8 and sharding.is_fully_replicated


def test_fsdp_state_bytes_per_device():
  """A model whose state is mostly in leaves with an axis divisible by 8:
  each device holds at most 1/8 (+5%) of the replicated state's bytes."""
  _, tx, params, _, _, _ = tiny_steps.setup(classes=1000, width=0.5)
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
  fwd, _, params, images, _, _ = tiny_steps.setup()
  ids = np.arange(_BATCH) % _CLASSES
  mask = (np.arange(_BATCH) < 11).astype(np.float32)
  batch = {'images': images[0], 'labels': ids.astype(np.int32), 'mask': mask}
  sums = {}
  for backend in ('pmap', 'jit', 'fsdp'):
    dp = tiny_steps.layout(backend)  # fsdp: the tiny model's kernels sharded
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
