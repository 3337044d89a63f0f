"""The tiny model, data and train step that tests/test_fsdp.py and
tests/test_parallel_backends.py train under each device layout: each layout's
three steps run once per session, and both files compare the same runs.

Stochastic depth and dropout are on, so the per-device rngs of every layout
must match; AGC clips some units and the EMA visibly moves in three steps.
"""
import functools
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import nfnets.models as M
from nfnets import optim
from nfnets.training import parallel
from nfnets.training import parallel_jit
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib

CLASSES, BATCH, SIZE, STEPS = 16, 16, 16, 3
TINY = dict(width=0.0625, depth=(1, 1, 1, 1), group_size=8, drop_rate=0.2,
            stochdepth_rate=0.1)
# A tiny model's kernels are sharded from 256 elements (the default,
# fsdp.MIN_SHARD_SIZE, would replicate most).
MIN_SHARD_SIZE = 256


def layout(name: str) -> parallel.DataParallel:
  """'pmap', 'jit' (replicated) or 'fsdp' over all local devices."""
  if name == 'fsdp':
    return parallel_jit.Jit(fsdp=True, min_shard_size=MIN_SHARD_SIZE)
  return parallel.make(ml_collections.ConfigDict(dict(backend=name,
                                                      fsdp=False)))


@functools.lru_cache(maxsize=None)
def setup(classes: int = CLASSES, width: float = TINY['width']):
  """(forward, tx, params, images [STEPS, BATCH, ...], labels, train_step):
  AGC, weight decay, Nesterov momentum, EMA 0.9, accumulation k=2."""
  fwd = M.forward_fn('F0', num_classes=classes, **dict(TINY, width=width))
  rng = np.random.RandomState(0)
  images = rng.randn(STEPS, BATCH, SIZE, SIZE, 3).astype(np.float32)
  labels = np.eye(classes, dtype=np.float32)[
      rng.randint(0, classes, (STEPS, BATCH))]
  params = M.init_params(fwd, jax.random.PRNGKey(0),
                         jnp.asarray(images[0, :1]))
  cfg = optim.default_optim_config()
  cfg.warmup_epochs = 0.0
  cfg.ema_decay = 0.9  # an EMA that visibly moves in 3 steps
  cfg.agc_clipping = 0.005  # small enough that AGC clips some units
  tx, _ = optim.make_optimizer(cfg, batch_size=BATCH, steps_per_epoch=10,
                               total_steps=100)
  train = step_lib.make_train_step(fwd, tx, ema_decay=cfg.ema_decay,
                                   grad_accum_steps=2, agc_stats=True)
  return fwd, tx, params, images, labels, train


class Run(NamedTuple):
  state: Any  # host numpy TrainState after STEPS steps
  metrics: List[Dict[str, np.ndarray]]  # per step, fetched
  shardings: Any  # of the device state's leaves
  peak_bytes: Optional[int]  # of the compiled step ('jit' layouts only)


@functools.lru_cache(maxsize=None)
def run(name: str) -> Run:
  """STEPS steps of setup()'s step under layout(name), the batches placed
  by the layout's prefetching put_batch."""
  _, tx, params, images, labels, train = setup()
  dp = layout(name)
  state = dp.put_state(state_lib.create(params, tx))
  step = dp.train_step(train)
  rng = np.asarray(jax.random.PRNGKey(1))
  host_batches = [{'images': images[i], 'labels': labels[i]}
                  for i in range(STEPS)]
  peak = None
  if name != 'pmap':  # the executable the steps run (jit's cache serves them)
    peak = peak_bytes(step.lower(state, dp.put_batch_now(host_batches[0]),
                                 rng).compile())
  metrics = []
  for batch in dp.put_batch(iter(host_batches), size=2):
    state, m = step(state, batch, rng)
    metrics.append(dp.fetch(m))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return Run(dp.get_state(state), metrics, shardings, peak)


def peak_bytes(compiled) -> int:
  """XLA's per-device peak of a compiled step: arguments + outputs +
  temporaries - aliased (donated) bytes."""
  ma = compiled.memory_analysis()
  return (ma.argument_size_in_bytes + ma.output_size_in_bytes +
          ma.temp_size_in_bytes - ma.alias_size_in_bytes)
