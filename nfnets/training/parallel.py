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
import jax
import numpy as np

from nfnets.training import parallel_jit
from nfnets.training.parallel_base import AXIS, DataParallel, local_sharding

__all__ = ['AXIS', 'DataParallel', 'Pmap', 'local_sharding', 'make']


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
    return parallel_jit.Jit(devices, fsdp=fsdp)
  raise ValueError(f"config.parallel.backend must be 'pmap' or 'jit', got "
                   f'{backend!r}.')
