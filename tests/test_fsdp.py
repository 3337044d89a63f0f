"""FSDP on the shards (nfnets.training.fsdp, the 'jit' backend with
fsdp=True) against the replicated 'jit' step, 8 fake CPU devices; the tiny
runs compared are tests/tiny_steps.py's."""
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from nfnets.training import fsdp
from nfnets.training import parallel
from nfnets.training import parallel_jit
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib

import tiny_steps


def _dp(fsdp_on, min_shard_size=tiny_steps.MIN_SHARD_SIZE):
  return parallel_jit.Jit(fsdp=fsdp_on, min_shard_size=min_shard_size)


def test_fsdp_step_equals_replicated_step():
  """Stochastic depth, dropout, AGC, EMA, accumulation k=2: after 3 steps
  the same params, momentum, EMA and metrics (rtol 1e-5)."""
  ref, ref_metrics = tiny_steps.run('jit')[:2]
  got, metrics, shardings, _ = tiny_steps.run('fsdp')
  specs = jax.tree.map(lambda s: s.spec, shardings)
  params = tiny_steps.setup()[2]
  assert int(got.step) == tiny_steps.STEPS and int(got.nonfinite) == 0
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref.ema_params,
                       params)
  assert max(jax.tree.leaves(moved)) > 1e-3  # the EMA did move
  for a, b in ((got.params, ref.params), (got.ema_params, ref.ema_params),
               (got.opt_state, ref.opt_state)):
    # atol: momentum of near-zero gradients (fresh biases).
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-5, atol=1e-7), a, b)
  for m, r in zip(metrics, ref_metrics):
    assert m.keys() == r.keys()
    assert 0 < m['agc/clipped_frac'] < 1  # totals over shards, as replicated
    for k in r:
      np.testing.assert_allclose(m[k], r[k], rtol=1e-5, err_msg=k)
  # The stored layout: kernels sharded on their last (unit) axis, gains,
  # biases and skip_gains replicated.
  flat = jax.tree_util.tree_leaves_with_path(
      specs.params, is_leaf=lambda x: isinstance(x, P))
  sharded = {jax.tree_util.keystr(k) for k, s in flat if fsdp.is_sharded(s)}
  assert any("'w'" in k for k in sharded), sharded
  for path, spec in flat:
    if fsdp.is_sharded(spec):
      assert tuple(spec)[-1] == parallel.AXIS and len(spec) >= 2, path


def _tanh_linear():
  """A classifier small enough to compile in a second, whose loss is not
  quadratic (so SAM's gradient differs from the plain one)."""
  def model(images, is_training):
    del is_training
    x = jnp.tanh(images.reshape(images.shape[0], -1))
    return {'logits': hk.Linear(8, name='linear')(x)}
  return hk.transform(model)


def test_sam_step_equals_its_definition_on_every_layout():
  """sam_rho > 0 under pmap, jit and jit + FSDP (the kernel sharded): one
  SGD step lands on params - lr * grad L(params + rho g / |g|), g = grad
  L(params) of the global batch, computed here on the host."""
  fwd = _tanh_linear()
  rng = np.random.RandomState(2)
  images = rng.randn(tiny_steps.BATCH, 4, 4, 3).astype(np.float32)
  labels = np.eye(8, dtype=np.float32)[rng.randint(0, 8, tiny_steps.BATCH)]
  params = jax.tree.map(np.asarray, fwd.init(jax.random.PRNGKey(0),
                                             images[:1], True))
  lr, rho = 0.5, 0.3
  loss = lambda p: jnp.mean(optax.softmax_cross_entropy(
      fwd.apply(p, None, images, True)['logits'], labels))
  g = jax.grad(loss)(params)
  norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g)))
  g_sam = jax.grad(loss)(jax.tree.map(lambda p, d: p + rho * d / norm,
                                      params, g))
  want = jax.tree.map(lambda p, d: p - lr * d, params, g_sam)
  plain = jax.tree.map(lambda p, d: p - lr * d, params, g)
  assert np.abs(want['linear']['w'] - plain['linear']['w']).max() > 1e-4
  tx = optax.sgd(lr)
  train = step_lib.make_train_step(fwd, tx, ema_decay=0.0, sam_rho=rho)
  batch = {'images': images, 'labels': labels}
  for dp in (parallel.Pmap(jax.local_devices()), _dp(False),
             _dp(True, min_shard_size=8)):
    state = dp.put_state(state_lib.create(params, tx))
    if getattr(dp, 'fsdp', False):  # the FSDP branch is the one exercised
      assert fsdp.is_sharded(state.params['linear']['w'].sharding.spec)
    state, _ = dp.train_step(train)(state, dp.put_batch_now(batch),
                                    np.asarray(jax.random.PRNGKey(1)))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-5, atol=1e-6), dp.get_state(state).params, want)


def test_unit_axis_spec():
  spec = functools.partial(fsdp.unit_axis_spec, num_devices=8)
  assert spec((3, 3, 64, 128)) == P(None, None, None, 'batch')
  assert spec((2048, 1000)) == P(None, 'batch')  # the output axis
  assert spec((2048, 1001)) == P()  # indivisible output axis: replicated
  assert spec((65536,)) == P()  # gains, biases: whole-tensor AGC units
  assert spec((3, 3, 8, 16)) == P()  # small
  assert fsdp.unit_axis_spec((3, 3, 64, 128), 1) == P()


def test_fsdp_tree_sum_counts_replicated_leaves_once():
  """Per-device partial sums of sharded leaves are summed over the mesh;
  replicated leaves' values are taken once."""
  dp = _dp(True)
  n = len(dp.devices)
  specs = {'a': P(None, parallel.AXIS), 'b': P()}
  a = np.arange(4 * 8 * n, dtype=np.float32).reshape(4, 8 * n)
  b = np.arange(6, dtype=np.float32) - 2.5

  def per_device(a_shard, b_full):
    sq = {'a': jnp.sum(a_shard ** 2), 'b': jnp.sum(b_full ** 2)}
    leaf = fsdp.fsdp_leaf_sum(sq, specs)
    return fsdp.fsdp_tree_sum(sq, specs), leaf['a'], leaf['b']

  total, leaf_a, leaf_b = jax.jit(jax.shard_map(
      per_device, mesh=dp.mesh, in_specs=(specs['a'], specs['b']),
      out_specs=(P(), P(), P()), check_vma=False))(a, b)
  np.testing.assert_allclose(leaf_a, (a ** 2).sum(), rtol=1e-6)
  np.testing.assert_allclose(leaf_b, (b ** 2).sum(), rtol=1e-6)
  np.testing.assert_allclose(total, (a ** 2).sum() + (b ** 2).sum(),
                             rtol=1e-6)


def test_fsdp_halves_the_step_peak_memory():
  """The FSDP step's per-device peak is at most half the replicated step's
  (the state, gradients and optimizer work are 1/devices; the gathered,
  standardised kernels are the one full-size copy): the executables of
  test_fsdp_step_equals_replicated_step. Figures at full size: scripts/
  benchmark.py --backend jit --fsdp --compile_only (docs/benchmarking.md)."""
  replicated = tiny_steps.run('jit').peak_bytes
  sharded = tiny_steps.run('fsdp').peak_bytes
  assert sharded <= 0.5 * replicated, (sharded, replicated)


def test_gather_with_all_reduce_transpose_matches_reduce_scatter():
  """The multi-process CPU gather (transpose = all-reduce + slice, avoiding
  gloo's reduce-scatter) has the same gradient as the plain all_gather."""
  dp = _dp(True)
  n = len(dp.devices)
  x = np.random.RandomState(0).randn(3, 2 * n).astype(np.float32)
  w = np.random.RandomState(1).randn(n, 3, 2 * n).astype(np.float32)

  def grads(gather):
    def per_device(x_shard, w_dev):
      loss = lambda v: jnp.sum(jnp.sin(gather(v)) * w_dev[0])
      return jax.grad(loss)(x_shard)
    spec = P(None, parallel.AXIS)
    return jax.jit(jax.shard_map(
        per_device, mesh=dp.mesh, in_specs=(spec, P(parallel.AXIS)),
        out_specs=spec, check_vma=False))(x, w)

  got = grads(fsdp._gather_last_psum_bwd)  # pylint: disable=protected-access
  want = grads(fsdp._all_gather_last)  # pylint: disable=protected-access
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # And both are the gradient of the global loss: sum over devices.
  np.testing.assert_allclose(
      want, np.cos(x) * w.sum(0), rtol=1e-5, atol=1e-5)
