"""Sharpness-Aware Minimisation (Foret et al. 2021), used for NFNet-F6+SAM.

SAM changes how the gradient is *computed*, not how it is applied, so it is
not an optax transformation: the training step calls :func:`sam_gradients`
instead of ``jax.value_and_grad`` and feeds the result to the usual optax
chain (AGC -> weight decay -> momentum -> lr)::

    (loss, aux), grads = sam_gradients(loss_fn, params, rho, batch,
                                       axis_name='i', has_aux=True)
    grads = jax.lax.pmean(grads, 'i')        # as for a plain step
    updates, opt_state = tx.update(grads, opt_state, params)

The ascent step:  ``g = grad L(w)``;  ``e = rho * g / ||g||_2`` (global norm
over the whole tree);  the returned gradient is ``grad L(w + e)``.  With
``axis_name`` the ascent gradient ``g`` is ``pmean``-ed first, so every
device perturbs the weights identically (the full-batch SAM ascent); without
it each device perturbs by its own shard's gradient ("m-sharpness" with m =
per-device batch), which is what the original SAM paper recommends for
generalisation.  The returned gradient is NOT averaged: pmean it as usual.
SAM doubles the cost of a step (two forward/backward passes).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

PyTree = Any


def sam_perturbation(grads: PyTree, rho: Any, eps: float = 1e-12) -> PyTree:
  """``rho * g / max(||g||, eps)`` (global L2 norm over the tree, float32)."""
  leaves = jax.tree_util.tree_leaves(grads)
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                      for g in leaves))  # float32 even for bf16 grads
  scale = rho / jnp.maximum(norm, eps)
  return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)


def sam_gradients(loss_fn: Callable[..., Any],
                  params: PyTree,
                  rho: Any,
                  *args: Any,
                  axis_name: Optional[str] = None,
                  has_aux: bool = False,
                  **kwargs: Any):
  """Loss at ``params`` and the SAM gradient ``grad loss_fn(params + e)``.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)``
      with ``has_aux``).  Any rng it needs should be passed in ``args`` /
      closed over; the same rng is used for both passes.
    params: parameter tree.
    rho: neighbourhood radius (0.05 is the SAM paper's ImageNet default).
      ``rho == 0`` returns the plain gradient (``e = 0``).
    *args, **kwargs: passed to ``loss_fn``.
    axis_name: if given, ``pmean`` the ascent gradient over this axis
      (inside ``pmap`` / ``shard_map``) before normalising it.
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    ``(loss, grads)`` or ``((loss, aux), grads)``: ``loss`` / ``aux`` from
    the unperturbed pass, ``grads`` the gradient at the perturbed point.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
  out, g = vg(params, *args, **kwargs)
  if axis_name is not None:
    g = jax.lax.pmean(g, axis_name)
  e = sam_perturbation(g, rho)
  perturbed = jax.tree_util.tree_map(lambda p, d: p + d.astype(p.dtype),
                                     params, e)
  _, g_sam = vg(perturbed, *args, **kwargs)
  return out, g_sam
