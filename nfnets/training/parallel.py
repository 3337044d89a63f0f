"""The one seam between the training code and the device layout.

`make(config.parallel)` returns a `DataParallel`: it owns where the train
state and the batches live and how the per-device steps (nfnets.training.step,
which only use collectives over the named axis AXIS) are wrapped. Callers see
host batches [per_host_batch, ...] and host pytrees; nothing else depends on
the backend.

  backend 'pmap' (`Pmap`, below): jax.pmap over this host's devices; the state
    is replicated, stacked on a leading device axis.
  backend 'jit' (nfnets.training.parallel_jit.Jit): jax.jit(jax.shard_map(...))
    over a 1-D mesh of all devices of all hosts; with fsdp=True the state is
    sharded over the mesh.
"""
import collections
import itertools
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

AXIS = 'batch'


class DataParallel:
  """Backend-independent part: prefetching, fetching replicated values."""

  def put_state(self, tree: Any) -> Any:
    """A host pytree (TrainState, params) -> the backend's device layout."""
    raise NotImplementedError

  def get_state(self, tree: Any) -> Any:
    """Device layout -> host numpy pytree (the global values)."""
    raise NotImplementedError

  def put_batch_now(self, batch: Any) -> Any:
    """One host batch {k: [per_host_batch, ...]} -> device layout."""
    raise NotImplementedError

  def train_step(self, fn: Callable) -> Callable:
    """fn(state, batch, rng) -> (state, metrics), per device -> wrapped."""
    raise NotImplementedError

  def eval_step(self, fn: Callable) -> Callable:
    """fn(params, batch) -> per-device sums -> wrapped, summed over all devices
    of all hosts."""
    raise NotImplementedError

  def fetch(self, tree: Any) -> Any:
    """Host numpy value of outputs that are identical on every device (the
    step's metrics, eval sums, state.step); blocks until they are ready."""
    return jax.tree.map(lambda x: self._first(np.asarray(
        x.addressable_shards[0].data)), tree)

  def _first(self, x: np.ndarray) -> np.ndarray:
    return x

  @staticmethod
  def bytes_per_device(tree: Any) -> int:
    """The most bytes any local device holds of `tree`'s arrays."""
    per = collections.Counter()
    for x in jax.tree.leaves(tree):
      for shard in x.addressable_shards:
        per[shard.device] += shard.data.nbytes
    return max(per.values()) if per else 0

  def put_batch(self, iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Moves host batches to the devices, `size` batches ahead (transfers are
    asynchronous, so they overlap the host pipeline and the step)."""
    queue, iterator = collections.deque(), iter(iterator)

    def enqueue(n):
      for batch in itertools.islice(iterator, n):
        queue.append(self.put_batch_now(batch))
    enqueue(max(1, size))
    while queue:
      yield queue.popleft()
      enqueue(1)

  def abstract_state(self, tree: Any) -> Any:
    """jax.ShapeDtypeStructs (with shardings) of put_state(tree), for
    `.lower()` without allocating."""
    raise NotImplementedError

  def abstract_batch(self, tree: Any) -> Any:
    """Same for put_batch_now of a host batch with these shapes."""
    raise NotImplementedError

  @property
  def num_devices(self) -> int:
    """Devices of all hosts that share the global batch."""
    raise NotImplementedError

  def state_for_checkpoint(self, state: Any) -> Any:
    """What the checkpointer saves: a host tree (pmap) or global arrays."""
    return self.get_state(state)

  def target_for_restore(self, host_state: Any) -> Any:
    """The restore target matching `host_state`; restored trees go through
    put_state."""
    return host_state


def local_sharding(devices=None) -> jax.sharding.NamedSharding:
  """Splits axis 0 over this host's devices: the layout of pmap's inputs."""
  devices = list(devices) if devices is not None else jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


class Pmap(DataParallel):
  """jax.pmap over `devices` (default: all local devices); a host batch
  [n * b, ...] becomes [n, b, ...], device i holding rows [i*b, (i+1)*b)."""

  def __init__(self, devices=None):
    self.devices = list(devices) if devices is not None else jax.local_devices()
    self._sharding = local_sharding(self.devices)
    # None: pmap over the devices of ALL hosts (collectives span hosts);
    # an explicit list restricts a single-host run.
    self._pmap_devices = list(devices) if devices is not None else None

  def put_state(self, tree):
    n = len(self.devices)
    return jax.tree.map(lambda x: jax.device_put(
        np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), self._sharding),
                        tree)

  def get_state(self, tree):
    return self.fetch(tree)

  def _first(self, x):
    return x[0]

  def put_batch_now(self, batch):
    n = len(self.devices)
    return jax.tree.map(lambda x: jax.device_put(
        np.reshape(x, (n, -1) + np.shape(x)[1:]), self._sharding), batch)

  def train_step(self, fn):
    # The state is donated; the root rng is broadcast: the step folds in the
    # step number and the device index itself.
    return jax.pmap(fn, axis_name=AXIS, in_axes=(0, 0, None),
                    donate_argnums=(0,), devices=self._pmap_devices)

  def eval_step(self, fn):
    return jax.pmap(lambda p, b: jax.lax.psum(fn(p, b), AXIS), axis_name=AXIS,
                    devices=self._pmap_devices)

  def abstract_state(self, tree):
    n = len(self.devices)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (n,) + np.shape(x), x.dtype, sharding=self._sharding), tree)

  def abstract_batch(self, tree):
    n = len(self.devices)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (n, x.shape[0] // n) + tuple(x.shape[1:]), x.dtype,
        sharding=self._sharding), tree)

  @property
  def num_devices(self) -> int:
    return len(self.devices) * jax.process_count()


def make(cfg=None, devices=None) -> DataParallel:
  """The seam for config.parallel: backend 'pmap' (default) or 'jit' (with
  optional fsdp). `devices` restricts a single-host run to some devices."""
  backend = cfg.backend if cfg is not None else 'pmap'
  fsdp = bool(cfg.fsdp) if cfg is not None else False
  if backend == 'pmap':
    if fsdp:
      raise ValueError("config.parallel.fsdp=True needs backend 'jit' (pmap "
                       "replicates the state); set config.parallel.backend="
                       "'jit' or fsdp=False.")
    return Pmap(devices)
  if backend == 'jit':
    from nfnets.training import parallel_jit  # pylint: disable=g-import-not-at-top
    return parallel_jit.Jit(devices, fsdp=fsdp)
  raise ValueError(f"config.parallel.backend must be 'pmap' or 'jit', got "
                   f'{backend!r}.')
