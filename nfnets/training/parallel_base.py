"""What every device layout provides (`DataParallel`) and the mesh axis name.

nfnets.training.parallel (pmap, `make`) and nfnets.training.parallel_jit
(jit, FSDP) build on it; the per-device steps use AXIS only.
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
