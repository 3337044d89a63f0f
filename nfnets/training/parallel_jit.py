"""The 'jit' backend: jax.jit(jax.shard_map(step)) over all devices of all hosts.

The per-device steps are the same functions pmap runs. The mesh is 1-D,
Mesh(devices, (AXIS,)); a host batch [per_host_batch, ...] becomes a slice of
one global array [global_batch, ...] split over AXIS
(jax.make_array_from_process_local_data: no host-side reshape).

FSDP (fsdp=True): params, optimizer state and EMA are stored sharded over the
mesh (each leaf on its largest axis divisible by the device count; leaves
smaller than `min_shard_size` elements or without such an axis replicated).
The step itself is unchanged: shard_map sees the state replicated (in_specs
P()), so XLA all-gathers the sharded leaves at the start of the step and
keeps only each device's slice of the updated state. Every device computes
the same update as in the replicated run, so AGC, weight-decay masks, EMA and
the non-finite skip behave identically; what FSDP saves is the memory the
state occupies between steps (1/devices of it per device), not the memory of
the step's temporaries, which still hold one gathered copy.
"""
import math
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from nfnets.training.parallel import AXIS, DataParallel


class Jit(DataParallel):
  """jit + shard_map over Mesh((AXIS,)) of `devices` (default jax.devices()).

  Args:
    devices: the mesh's devices; default all devices of all hosts.
    fsdp: store the state sharded over the mesh (see module doc).
    min_shard_size: leaves with fewer elements stay replicated under FSDP.
  """

  def __init__(self, devices=None, fsdp: bool = False,
               min_shard_size: int = 2 ** 14):
    self.devices = list(devices) if devices is not None else jax.devices()
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.fsdp = fsdp
    self.min_shard_size = min_shard_size
    self._batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def spec(self, shape) -> P:
    """Where a state leaf of this shape lives: P() or AXIS on one axis."""
    n = len(self.devices)
    if not self.fsdp or n == 1 or math.prod(shape) < self.min_shard_size:
      return P()
    axes = [i for i, d in enumerate(shape) if d % n == 0]
    if not axes:
      return P()
    axis = max(axes, key=lambda i: shape[i])  # the first of the largest
    return P(*([None] * axis + [AXIS]))

  def shardings(self, tree: Any) -> Any:
    return jax.tree.map(
        lambda x: NamedSharding(self.mesh, self.spec(np.shape(x))), tree)

  def put_state(self, tree):
    def put(x, sharding):
      x = np.asarray(x)  # the same host value on every process
      return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])
    return jax.tree.map(put, tree, self.shardings(tree))

  def get_state(self, tree):
    def get(x):
      if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)

  def put_batch_now(self, batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        self._batch_sharding, np.asarray(x)), batch)

  def abstract_state(self, tree):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
        np.shape(x), x.dtype, sharding=s), tree, self.shardings(tree))

  def abstract_batch(self, tree):
    """Host batch shapes (per host) -> global abstract batch."""
    hosts = jax.process_count()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (x.shape[0] * hosts,) + tuple(x.shape[1:]), x.dtype,
        sharding=self._batch_sharding), tree)

  def train_step(self, fn: Callable) -> Callable:
    # check_vma=False: the state enters replicated (P()) and the gradient is
    # taken per device and pmean'd by the step itself, exactly as under pmap
    # (with check_vma=True, jax.grad would psum it over AXIS first).
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS), P()),
                           out_specs=(P(), P()), check_vma=False)

    def step(state, batch, rng):
      state, metrics = mapped(state, batch, rng)
      # Keep the stored layout (sharded under FSDP): XLA slices the update.
      return jax.lax.with_sharding_constraint(state, self.shardings(state)), \
          metrics
    return jax.jit(step, donate_argnums=(0,))

  def eval_step(self, fn: Callable) -> Callable:
    return jax.jit(jax.shard_map(
        lambda p, b: jax.lax.psum(fn(p, b), AXIS), mesh=self.mesh,
        in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False))

  def state_for_checkpoint(self, state):
    return state  # global (possibly sharded) arrays

  @property
  def num_devices(self) -> int:
    return len(self.devices)
