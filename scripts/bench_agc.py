#!/usr/bin/env python3
"""Benchmark nfnets.optim.adaptive_grad_clip on the full NFNet parameter tree.

1. One jitted AGC update on the whole NFNet-F0 parameter tree (shapes from
   ``nfnets.models.param_shapes``), ours vs ``optax.adaptive_grad_clip``, in
   the same process, interleaved, median of many runs after warm-up
   (``block_until_ready``); reported as a ratio ours / optax.
2. AGC's share of a full training step: a jitted F0 forward + backward +
   optimizer step (recipe chain: AGC -> weight decay -> Nesterov SGD) at
   batch 8, 192 px, float32, vs the same step without AGC (interleaved,
   median).  Also printed: standalone AGC time / step time, an upper bound
   (a standalone call pays its own dispatch and output allocation).

Usage:  python scripts/bench_agc.py [--reps 30] [--step-reps 3] [--no-step]
Prints a small table and one JSON line (prefix ``JSON:``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nfnets.models as models
import nfnets.optim as nfo


def _block(x):
  return jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def random_tree(shapes, key, scale, log10_spread=0.0):
  """Normal leaves; each leaf's std is scale * 10**U(-spread/2, spread/2)."""
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  spread = np.random.default_rng(0).uniform(-0.5, 0.5, len(leaves))
  scales = [scale * 10.0 ** (log10_spread * u) for u in spread]

  @jax.jit
  def make(keys):
    return [jax.random.normal(k, s.shape, s.dtype) * c
            for k, s, c in zip(keys, leaves, scales)]

  return jax.tree_util.tree_unflatten(treedef, make(keys))


def time_interleaved(fns: dict, args, reps: int, warmup: int = 3):
  """Median wall time (s) of each fn(*args), runs interleaved round-robin."""
  for _ in range(warmup):
    for f in fns.values():
      _block(f(*args))
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t0 = time.perf_counter()
      _block(f(*args))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}, times


def bench_agc_update(variant: str, reps: int, clipping: float = 0.01):
  shapes = models.param_shapes(variant)
  n_params = int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(
      shapes)))
  params = random_tree(shapes, jax.random.PRNGKey(0), 0.05)
  # gradients at a scale where some units clip and some do not
  grads = random_tree(shapes, jax.random.PRNGKey(1), 5e-4, log10_spread=3.0)
  ours_tx = nfo.adaptive_grad_clip(clipping)
  optax_tx = optax.adaptive_grad_clip(clipping)
  ours = jax.jit(lambda g, p: ours_tx.update(g, optax.EmptyState(), p)[0])
  ref = jax.jit(lambda g, p: optax_tx.update(g, optax.EmptyState(), p)[0])
  a, b = ours(grads, params), ref(grads, params)
  max_rel = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
                for x, y in zip(jax.tree_util.tree_leaves(a),
                                jax.tree_util.tree_leaves(b)))
  n_clipped_leaves = sum(
      int(not bool(jnp.array_equal(x, g)))
      for x, g in zip(jax.tree_util.tree_leaves(a),
                      jax.tree_util.tree_leaves(grads)))
  del a, b
  med, _ = time_interleaved({'ours': ours, 'optax': ref}, (grads, params),
                            reps)
  nbytes = 3 * 4 * n_params  # read g, read p, write g'
  return {
      'variant': variant, 'n_params': n_params,
      'n_leaves': len(jax.tree_util.tree_leaves(shapes)),
      'leaves_changed_by_clipping': n_clipped_leaves,
      'max_rel_diff_vs_optax': max_rel,
      'agc_ours_ms': med['ours'] * 1e3, 'agc_optax_ms': med['optax'] * 1e3,
      'ratio_ours_over_optax': med['ours'] / med['optax'],
      'ours_GBps': nbytes / med['ours'] / 1e9, 'reps': reps,
  }


def bench_train_step(variant: str, batch: int, image_size: int, reps: int):
  fwd = models.forward_fn(variant, num_classes=1000)
  shapes = models.param_shapes(variant)
  params = random_tree(shapes, jax.random.PRNGKey(0), 0.05)
  rng = jax.random.PRNGKey(2)
  images = jax.random.normal(jax.random.PRNGKey(3),
                             (batch, image_size, image_size, 3), jnp.float32)
  labels = jax.nn.one_hot(jnp.arange(batch) % 1000, 1000)

  def loss_fn(p, rng, x, y):
    logits = fwd.apply(p, rng, x, True)['logits']
    return optax.softmax_cross_entropy(logits, y).mean()

  def make_step(use_agc):
    cfg = nfo.default_optim_config()
    cfg.use_agc = use_agc
    cfg.warmup_epochs = 0
    tx, _ = nfo.make_optimizer(cfg, batch_size=4096, steps_per_epoch=100,
                               total_steps=1000)

    def step(p, s, rng, x, y):
      loss, g = jax.value_and_grad(loss_fn)(p, rng, x, y)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    return tx, jax.jit(step)

  out = {'batch': batch, 'image_size': image_size, 'reps': reps}
  runners = {}
  for name, use_agc in (('with_agc', True), ('without_agc', False)):
    tx, step = make_step(use_agc)
    state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, state, rng, images, labels).compile()
    out[f'compile_{name}_s'] = time.perf_counter() - t0
    runners[name] = (compiled, state)
  fns = {k: (lambda c, s: (lambda: c(params, s, rng, images, labels)[2]))(
      *v) for k, v in runners.items()}
  med, all_times = time_interleaved(fns, (), reps, warmup=1)
  out['step_with_agc_s'] = med['with_agc']
  out['step_without_agc_s'] = med['without_agc']
  out['agc_share_measured'] = ((med['with_agc'] - med['without_agc'])
                               / med['with_agc'])
  out['step_times_s'] = {k: [round(t, 4) for t in v]
                         for k, v in all_times.items()}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--variant', default='F0')
  ap.add_argument('--reps', type=int, default=30)
  ap.add_argument('--step-reps', type=int, default=3)
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--image-size', type=int, default=192)
  ap.add_argument('--no-step', action='store_true',
                  help='skip the (heavy) full training-step benchmark')
  args = ap.parse_args(argv)

  dev = jax.devices()[0]
  res = {'device': f'{dev.platform}:{dev.device_kind}',
         'n_devices': jax.device_count(), 'jax': jax.__version__,
         'optax': optax.__version__}

  def show(rows):  # printed as soon as each part is done
    for k, v in rows:
      print(f'{k:<44}  {v}', flush=True)

  res['agc'] = a = bench_agc_update(args.variant, args.reps)
  show([
      ('device', res['device']),
      (f"{args.variant} params / leaves",
       f"{a['n_params']:,} / {a['n_leaves']}"),
      ('AGC update alone, ours (median)', f"{a['agc_ours_ms']:.2f} ms"
       f"  ({a['ours_GBps']:.1f} GB/s)"),
      ('AGC update alone, optax (median)', f"{a['agc_optax_ms']:.2f} ms"),
      ('ratio ours / optax', f"{a['ratio_ours_over_optax']:.3f}x"),
      ('max rel. diff vs optax', f"{a['max_rel_diff_vs_optax']:.2e}"),
  ])
  if not args.no_step:
    s = bench_train_step(args.variant, args.batch, args.image_size,
                         args.step_reps)
    # Upper bound only: a standalone jitted call also pays for its own
    # dispatch and output allocation, which inside the fused step it does not.
    s['agc_standalone_over_step'] = (a['agc_ours_ms'] / 1e3
                                     / s['step_with_agc_s'])
    res['step'] = s
    show([
        (f"train step b{args.batch} {args.image_size}px, with AGC",
         f"{s['step_with_agc_s'] * 1e3:.1f} ms"),
        ('train step, without AGC', f"{s['step_without_agc_s'] * 1e3:.1f} ms"),
        ('AGC share, measured (t_agc - t_no) / t_agc',
         f"{100 * s['agc_share_measured']:.2f} %"),
        ('AGC alone / step (upper bound)',
         f"{100 * s['agc_standalone_over_step']:.2f} %"),
        ('compile with / without AGC', f"{s['compile_with_agc_s']:.1f} s / "
         f"{s['compile_without_agc_s']:.1f} s"),
    ])
  print('JSON: ' + json.dumps(res))
  return res


if __name__ == '__main__':
  main()
