"""The 'jit' backend: jax.jit(jax.shard_map(step)) over all devices of all hosts.

The per-device steps are the same functions pmap runs. The mesh is 1-D,
Mesh(devices, (AXIS,)); a host batch [per_host_batch, ...] becomes a slice of
one global array [global_batch, ...] split over AXIS
(jax.make_array_from_process_local_data: no host-side reshape).

FSDP (fsdp=True): params, optimizer state and EMA are stored sharded over the
mesh on their unit axis (nfnets.training.fsdp.unit_axis_spec), and the step
runs on the shards: shard_map's in/out specs are the state's own shardings,
and the per-device step, traced under an fsdp.layout, gathers each layer's
weights where the layer runs and gets back reduce-scattered (sharded)
gradients. Optimizer, AGC (unit-wise norms are local to a shard) and EMA then
work on each device's shard; global norms and the non-finite check sum the
shards (fsdp.fsdp_tree_sum). The eval step gathers per layer the same way.
"""
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from nfnets.training import fsdp as fsdp_lib
from nfnets.training.parallel_base import AXIS, DataParallel


class Jit(DataParallel):
  """jit + shard_map over Mesh((AXIS,)) of `devices` (default jax.devices()).

  Args:
    devices: the mesh's devices; default all devices of all hosts.
    fsdp: store the state sharded over the mesh and run the step on the
      shards (see module doc).
    min_shard_size: leaves with fewer elements stay replicated under FSDP.
  """

  def __init__(self, devices=None, fsdp: bool = False,
               min_shard_size: int = fsdp_lib.MIN_SHARD_SIZE):
    self.devices = list(devices) if devices is not None else jax.devices()
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.fsdp = fsdp
    self.min_shard_size = min_shard_size
    self._batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def spec(self, shape) -> P:
    """Where a state leaf of this (global) shape lives: P(), or AXIS on its
    last axis (fsdp.unit_axis_spec)."""
    if not self.fsdp:
      return P()
    return fsdp_lib.unit_axis_spec(shape, len(self.devices),
                                   self.min_shard_size)

  def specs(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: self.spec(np.shape(x)), tree)

  def shardings(self, tree: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s),
                        self.specs(tree))

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

  def _in_layout(self, fn: Callable, param_specs: Any) -> Callable:
    """fn, traced with the params laid out by `param_specs` (FSDP)."""
    if not self.fsdp:
      return fn

    def wrapped(*args):
      with fsdp_lib.layout(param_specs):
        return fn(*args)
    return wrapped

  def train_step(self, fn: Callable) -> Callable:
    # check_vma=False: the gradient is taken per device and reduced by the
    # step itself, exactly as under pmap (with check_vma=True, jax.grad would
    # psum the replicated leaves' gradients over AXIS first).
    def step(state, batch, rng):
      specs = self.specs(state)
      # Only an FSDP step needs the params' layout (a TrainState's).
      param_specs = specs.params if self.fsdp else None
      mapped = jax.shard_map(
          self._in_layout(fn, param_specs), mesh=self.mesh,
          in_specs=(specs, P(AXIS), P()), out_specs=(specs, P()),
          check_vma=False)
      return mapped(state, batch, rng)
    return jax.jit(step, donate_argnums=(0,))

  def eval_step(self, fn: Callable) -> Callable:
    def step(params, batch):
      specs = self.specs(params)
      per_device = self._in_layout(fn, specs)
      return jax.shard_map(
          lambda p, b: jax.lax.psum(per_device(p, b), AXIS), mesh=self.mesh,
          in_specs=(specs, P(AXIS)), out_specs=P(), check_vma=False)(
              params, batch)
    return jax.jit(step)

  def state_for_checkpoint(self, state):
    return state  # global (possibly sharded) arrays

  @property
  def num_devices(self) -> int:
    return len(self.devices)
