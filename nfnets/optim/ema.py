"""Exponential moving average of parameters, with the release's warmup form.

``decay(step) = min(max_decay, (1 + step) / (10 + step))``: early in
training the average forgets quickly (decay 0.1 at step 0, 0.5 at step 8,
0.9 at step 80, 0.99 at step 890), so short runs and the first evaluations
of long ones use a meaningful EMA; later it saturates at ``max_decay``
(0.99999 in the paper, reached after ~900k steps).

Both functions are pure ``jnp`` and jit / pmap friendly (``step`` may be a
traced integer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def ema_decay(step: Any, max_decay: Any = 0.99999) -> jax.Array:
  """``min(max_decay, (1 + step) / (10 + step))`` as a float32 scalar."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.asarray(max_decay, jnp.float32),
                     (1.0 + step) / (10.0 + step))


def ema_update(ema_params: PyTree, params: PyTree, step: Any,
               max_decay: Any = 0.99999) -> PyTree:
  """``ema <- d * ema + (1 - d) * params`` with ``d = ema_decay(step)``.

  Computed in float32 (or wider), cast back to each EMA leaf's dtype.
  Non-floating leaves (e.g. integer counters in a state tree) are copied
  from ``params``.  Call it after the optimizer step with the step index of
  that update (0 for the first update).
  """
  d = ema_decay(step, max_decay)

  def upd(e, p):
    e = jnp.asarray(e)
    p = jnp.asarray(p)
    if not jnp.issubdtype(e.dtype, jnp.inexact):
      return p
    dt = jnp.promote_types(e.dtype, jnp.float32)
    dd = d.astype(dt)
    new = e.astype(dt) * dd + p.astype(dt) * (1 - dd)
    return new.astype(e.dtype)

  return jax.tree_util.tree_map(upd, ema_params, params)
