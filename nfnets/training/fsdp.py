"""FSDP inside the per-device step: which leaves are sharded, gathering each
layer's weights where it runs, and reductions that count shards correctly.

The 'jit' backend with fsdp=True (nfnets.training.parallel_jit) runs the
per-device steps of nfnets.training.step under shard_map with the state's
own shardings, and makes a `Layout` current while they are traced. The
steps then see each sharded leaf as this device's slice of it and:

  * run the model through `apply(forward)`: a Haiku custom getter
    all-gathers a sharded parameter where the layer asks for it, and a
    WSConv2D kernel hook (nfnets.models.layers.kernel_hook) standardises
    this device's output channels first and gathers the standardised
    kernel. The transpose of the gather is a reduce-scatter, so the
    gradient of a sharded leaf comes back sharded and summed over devices;
  * average gradients with `device_mean` (sharded: / devices; replicated:
    pmean) and take global norms with `fsdp_tree_sum`.

Only a unit axis is sharded (`unit_axis_spec`): the last axis of kernels
(HWIO convs, [in, out] linears), so AGC's unit-wise norms are local to a
shard. Leaves with ndim <= 1 (gains, biases, skip_gain: whole-tensor AGC
units), small leaves and leaves whose last axis is not divisible by the
device count stay replicated. Without a current layout (pmap, plain jit)
everything here is the replicated step's arithmetic.
"""
import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nfnets.models import layers
from nfnets.training.parallel_base import AXIS

# Leaves with fewer elements stay replicated (a gather costs more than it saves).
MIN_SHARD_SIZE = 2 ** 14


def unit_axis_spec(shape, num_devices: int,
                   min_shard_size: int = MIN_SHARD_SIZE) -> P:
  """Where a state leaf of this (global) shape lives: sharded over AXIS on its
  last (unit) axis, or replicated (P())."""
  shape = tuple(shape)
  if (num_devices <= 1 or len(shape) < 2 or
      math.prod(shape) < min_shard_size or shape[-1] % num_devices):
    return P()
  return P(*([None] * (len(shape) - 1) + [AXIS]))


def is_sharded(spec: Any) -> bool:
  return isinstance(spec, P) and AXIS in tuple(spec)


def replicated_bytes(tree: Any, specs: Any) -> int:
  """Bytes of the leaves of `tree` that `specs` leaves replicated."""
  return int(sum(
      math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
      for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(specs))
      if not is_sharded(s)))


@dataclasses.dataclass(frozen=True)
class Layout:
  """The specs (a PartitionSpec per leaf) of the params a step sees."""
  param_specs: Any

  def param_spec(self, module_name: str, name: str) -> P:
    return self.param_specs.get(module_name, {}).get(name, P())


_LAYOUT: contextvars.ContextVar[Optional[Layout]] = contextvars.ContextVar(
    'nfnets_fsdp_layout', default=None)


@contextlib.contextmanager
def layout(param_specs: Any) -> Iterator[None]:
  """Within this context (while a per-device step is traced under shard_map)
  params follow `param_specs`."""
  token = _LAYOUT.set(Layout(param_specs))
  try:
    yield
  finally:
    _LAYOUT.reset(token)


def current() -> Optional[Layout]:
  """The active Layout, or None (replicated params)."""
  return _LAYOUT.get()


def _all_gather_last(x: jax.Array) -> jax.Array:
  return jax.lax.all_gather(x, AXIS, axis=x.ndim - 1, tiled=True)


@jax.custom_vjp
def _gather_last_psum_bwd(x: jax.Array) -> jax.Array:
  return _all_gather_last(x)


def _gather_fwd(x):
  return _all_gather_last(x), None


def _gather_bwd(_, g):
  c = g.shape[-1] // jax.lax.axis_size(AXIS)
  full = jax.lax.psum(g, AXIS)
  start = jax.lax.axis_index(AXIS) * c
  return (jax.lax.dynamic_slice_in_dim(full, start, c, axis=g.ndim - 1),)


_gather_last_psum_bwd.defvjp(_gather_fwd, _gather_bwd)


def _gather_last(x: jax.Array) -> jax.Array:
  """All-gathers the last axis; its transpose reduce-scatters. On CPU with
  several processes (gloo collectives) the transpose is an all-reduce and a
  slice instead: gloo's reduce-scatter times out after 30 s whatever the
  configured timeout and can return wrong values for large chunks
  (jax-ml/jax#40831, #40830)."""
  if jax.default_backend() == 'cpu' and jax.process_count() > 1:
    return _gather_last_psum_bwd(x)
  return _all_gather_last(x)


class _Gatherer:
  """The custom getter and the WSConv2D kernel hook of one forward pass.

  Haiku checks that a parameter comes out of the getters with its full
  shape, so for a sharded WSConv2D kernel the getter keeps this device's
  shard aside and returns a full-shape placeholder that nothing computes
  with (the hook ignores it; XLA removes it); the hook standardises the
  shard with its output channels' gains and gathers the standardised kernel.
  Every other sharded parameter is gathered where the layer asks for it.
  """

  def __init__(self, lay: Layout):
    self.layout = lay
    self.shards = {}

  def getter(self, next_getter, value, context):
    spec = self.layout.param_spec(context.module_name, context.name)
    if is_sharded(spec):
      if isinstance(context.module, layers.WSConv2D) and context.name == 'w':
        self.shards[context.module_name] = value
        value = jnp.zeros(context.original_shape, value.dtype)
      else:
        value = _gather_last(value)
    return next_getter(value)

  def kernel_hook(self, module, w, gain, standardize):
    shard = self.shards.pop(module.module_name, None)
    if shard is None:  # a replicated kernel
      return standardize(w, gain)
    c = shard.shape[-1]
    start = jax.lax.axis_index(AXIS) * c
    local_gain = jax.lax.dynamic_slice_in_dim(gain, start, c)
    return _gather_last(standardize(shard, local_gain))


def apply(forward: hk.Transformed) -> Callable[..., Any]:
  """forward.apply, gathering sharded params per layer under the current
  layout (read when the returned function is called, i.e. traced)."""
  def run(params, rng, *args, **kwargs):
    lay = current()
    if lay is None:
      return forward.apply(params, rng, *args, **kwargs)

    def inner(params, rng, *args, **kwargs):
      gatherer = _Gatherer(lay)
      with hk.custom_getter(gatherer.getter), layers.kernel_hook(
          gatherer.kernel_hook):
        return forward.apply(params, rng, *args, **kwargs)
    # hk.custom_getter needs a Haiku frame: an outer transform without
    # parameters of its own.
    return hk.transform(inner).apply({}, None, params, rng, *args, **kwargs)
  return run


def _specs_or_replicated(specs: Any, tree: Any) -> Any:
  if specs is None:
    return jax.tree.map(lambda _: P(), tree)
  return specs


def device_mean(tree: Any, specs: Any) -> Any:
  """Mean over AXIS of per-device gradients: a sharded leaf's gradient is
  already the sum over devices (the gather's transpose), so it is divided
  by the device count; replicated leaves are pmean'd. specs=None: all
  replicated. The identity on one device."""
  n = jax.lax.axis_size(AXIS)
  if n == 1:
    return tree
  specs = _specs_or_replicated(specs, tree)
  flat, treedef = jax.tree.flatten(tree)
  flat_specs = treedef.flatten_up_to(specs)
  rep = [i for i, s in enumerate(flat_specs) if not is_sharded(s)]
  means = jax.lax.pmean([flat[i] for i in rep], AXIS) if rep else []
  out = [x / jnp.asarray(n, x.dtype) for x in flat]
  for i, m in zip(rep, means):
    out[i] = m
  return treedef.unflatten(out)


def fsdp_leaf_sum(values: Any, specs: Any) -> Any:
  """Per-leaf totals over the mesh: values of sharded leaves (partial sums
  over this device's shard, any shape) are psum'd over AXIS, values of
  replicated leaves are returned as they are (counted once). `specs` is a
  prefix of `values` (one spec per param leaf); specs=None: all replicated."""
  if specs is None:
    return values
  flat_specs, treedef = jax.tree.flatten(specs)
  parts = treedef.flatten_up_to(values)
  idx = [i for i, s in enumerate(flat_specs) if is_sharded(s)]
  summed = jax.lax.psum([parts[i] for i in idx], AXIS) if idx else []
  for i, s in zip(idx, summed):
    parts[i] = s
  return treedef.unflatten(parts)


def fsdp_tree_sum(values: Any, specs: Any) -> jax.Array:
  """The sum of all per-leaf values (scalars, e.g. squared norms of each
  leaf's local part) over the whole mesh, each replicated leaf counted once:
  one psum of the sharded leaves' local total. specs=None: all replicated."""
  leaves = jax.tree.leaves(values)
  if specs is None:
    return sum(leaves, jnp.zeros((), jnp.float32))
  flat_specs, treedef = jax.tree.flatten(specs)
  parts = treedef.flatten_up_to(values)
  sharded = sum((jnp.sum(jnp.asarray(v, jnp.float32)) for v, s in
                 zip(parts, flat_specs) if is_sharded(s)),
                jnp.zeros((), jnp.float32))
  replicated = sum((jnp.sum(jnp.asarray(v, jnp.float32)) for v, s in
                    zip(parts, flat_specs) if not is_sharded(s)),
                   jnp.zeros((), jnp.float32))
  return jax.lax.psum(sharded, AXIS) + replicated


def squared_norm(tree: Any, specs: Any) -> jax.Array:
  """Squared global L2 norm (float32) of a tree laid out by `specs`."""
  per_leaf = jax.tree.map(
      lambda x: jnp.sum(jnp.square(x.astype(jnp.float32))), tree)
  if specs is None:
    return jax.tree.reduce(jnp.add, per_leaf, jnp.zeros((), jnp.float32))
  return fsdp_tree_sum(per_leaf, specs)
