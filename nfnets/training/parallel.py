"""The data-parallel wrapper, kept in one place.

The per-device step functions (nfnets.training.step) only use collectives
over the named axis AXIS, so the same functions run under
`jax.pmap(..., axis_name=AXIS)` (below) or `jax.jit(shard_map(...))`.
"""
from typing import Any, Callable

import jax
import numpy as np

AXIS = 'batch'


def pmap_train_step(train_step: Callable, devices=None) -> Callable:
  """pmaps train_step(state, batch, rng) -> (state, metrics).

  The state is donated; the root rng is broadcast (not replicated): the step
  folds in the step number and the device index itself.
  """
  return jax.pmap(train_step, axis_name=AXIS, in_axes=(0, 0, None),
                  donate_argnums=(0,), devices=devices)


def pmap_eval_step(eval_step: Callable, devices=None) -> Callable:
  """pmaps eval_step(params, batch) -> sums, psum'd over every device (of
  every host), so each host gets the global totals."""
  def summed(params, batch):
    return jax.lax.psum(eval_step(params, batch), AXIS)
  return jax.pmap(summed, axis_name=AXIS, devices=devices)


def local_sharding(devices=None) -> jax.sharding.NamedSharding:
  """Splits axis 0 over this host's devices: the layout of pmap's inputs."""
  devices = list(devices) if devices is not None else jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any, devices=None) -> Any:
  """Copies a host pytree onto every local device (or `devices`), stacked on
  axis 0 (the layout pmap expects)."""
  devices = list(devices) if devices is not None else jax.local_devices()
  sharding = local_sharding(devices)
  n = len(devices)

  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x, (n,) + x.shape), sharding)
  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data)[0]
                      if hasattr(x, 'addressable_shards') else x[0], tree)


def shard(tree: Any) -> Any:
  """Reshapes host arrays [local_devices * n, ...] to [local_devices, n, ...]."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), tree)
