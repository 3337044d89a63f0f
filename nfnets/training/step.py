"""Pure per-device train and eval steps.

They use collectives over `parallel.AXIS` only, so they run under pmap
(nfnets.training.parallel) or jit(shard_map(...)) unchanged.
"""
from typing import Callable, Dict

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets import optim
from nfnets.training import fsdp
from nfnets.training.parallel_base import AXIS
from nfnets.training.state import TrainState


def _device_mean(tree):
  """pmean over the device axis; the identity on one device (XLA:CPU would
  still copy every gradient through a one-replica all-reduce)."""
  if jax.lax.axis_size(AXIS) == 1:
    return tree
  return jax.lax.pmean(tree, AXIS)


def _param_specs():
  """The params' layout under FSDP (nfnets.training.fsdp), None otherwise."""
  lay = fsdp.current()
  return None if lay is None else lay.param_specs


def _grad_mean(grads):
  """Gradients averaged over devices, whichever the params' layout."""
  specs = _param_specs()
  return _device_mean(grads) if specs is None else fsdp.device_mean(
      grads, specs)


def _squared_norm(tree):
  """Squared global norm; under FSDP shards are summed over the mesh."""
  specs = _param_specs()
  if specs is None:
    return optax.tree.norm(tree, squared=True)
  return fsdp.squared_norm(tree, specs)


def _agc_totals(opt_state):
  """Under FSDP, AGC's per-leaf statistics (optim.AGCState) count this
  device's shard of each sharded kernel: total them over the mesh
  (replicated leaves once), so that the stored state and the agc/* metrics
  are those of the replicated step. The identity otherwise."""
  specs = _param_specs()
  if specs is None:
    return opt_state
  is_agc = lambda x: isinstance(x, optim.AGCState)
  return jax.tree.map(
      lambda x: optim.AGCState(*(fsdp.fsdp_leaf_sum(t, specs) for t in x))
      if is_agc(x) else x, opt_state, is_leaf=is_agc)


def _sam_gradients(loss_fn, params, rho, *args):
  """optim.sam_gradients, for sharded params too: the ascent gradient is
  averaged and normalised over the whole mesh (fsdp reductions)."""
  if _param_specs() is None:
    return optim.sam_gradients(loss_fn, params, rho, *args, axis_name=AXIS,
                               has_aux=True)
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  out, g = vg(params, *args)
  g = _grad_mean(g)
  scale = rho / jnp.maximum(jnp.sqrt(_squared_norm(g)), 1e-12)
  perturbed = jax.tree.map(lambda p, d: p + (d * scale).astype(p.dtype),
                           params, g)
  return out, vg(perturbed, *args)[1]


def make_train_step(forward: hk.Transformed, tx: optax.GradientTransformation,
                    *, compute_dtype=jnp.float32, ema_decay: float = 0.99999,
                    sam_rho: float = 0.0, grad_accum_steps: int = 1,
                    agc_stats: bool = False) -> Callable:
  """Returns train_step(state, batch, rng) -> (state, metrics).

  Args:
    forward: hk.transform of model(images, is_training) -> {'logits': ...}.
    tx: the optimizer (gets gradients averaged over AXIS, and params).
    compute_dtype: dtype of the forward/backward pass (params stay float32).
    ema_decay: max EMA decay (0 disables the EMA update).
    sam_rho: SAM radius (0 = plain gradients; with accumulation, each
      micro-batch is perturbed by its own gradient).
    grad_accum_steps: k > 1 splits the per-device batch into k equal
      micro-batches run one after another (lax.scan; activations of one
      micro-batch at a time), sums their float32 gradients and divides by
      k. The optimizer (AGC, weight decay, momentum) and the EMA then act
      once, on the accumulated gradient -- clipping each micro-batch would
      be a different update. No buffer outlives the step. The micro-batch
      index is folded into the rng; loss and top1 are micro-batch means.
    agc_stats: add AGC's clipping statistics of this update to the metrics
      ('agc/clipped_frac', 'agc/clip_factor', and per group '.../stem', ...,
      from the optimizer state: nfnets.optim.agc_statistics); nothing when
      the optimizer has no AGC. A skipped step reports the previous ones.

  batch: 'images' [B, H, W, C]; 'labels' [B, num_classes] soft targets
  (one-hot, smoothed and/or mixed). A step whose loss or gradients are not
  finite leaves params, optimizer state and EMA unchanged and increments
  state.nonfinite (reset by the next finite step).

  The gradients count as finite when their squared global norm is: a NaN or
  inf anywhere makes it NaN/inf, and so does a norm above ~1.8e19 (float32
  overflow), which is as unusable as an inf. The same reduction gives the
  'grad_norm' metric, so the check costs no extra pass over the gradients.
  'param_norm' is the norm of the updated params (computed from the
  update's outputs, so the old params' buffers can be reused in place).
  """
  # Under FSDP (nfnets.training.fsdp), gathers each layer's weights there.
  apply = fsdp.apply(forward)

  def loss_fn(params, images, labels, rng):
    logits = apply(params, rng, images, True)['logits']
    loss = jnp.mean(optax.softmax_cross_entropy(logits, labels))
    return loss, logits

  if int(grad_accum_steps) != grad_accum_steps or grad_accum_steps < 1:
    raise ValueError('grad_accum_steps must be a positive integer, got '
                     f'{grad_accum_steps!r}.')
  k = int(grad_accum_steps)

  def micro_step(params, images, labels, rng):
    """(loss, top1, grads) of one (micro-)batch on this device."""
    if sam_rho > 0:
      (loss, logits), grads = _sam_gradients(
          loss_fn, params, sam_rho, images, labels, rng)
    else:
      (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, images, labels, rng)
    top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
    return loss, top1.astype(jnp.float32), grads

  def accumulate(params, images, labels, rng):
    """Mean loss, top1 and float32 gradients over k micro-batches."""
    batch = images.shape[0]
    if batch % k:
      raise ValueError(
          f'The per-device batch ({batch} examples) is not divisible by '
          f'grad_accum_steps={k}. Choose train.batch_size so that batch_size '
          f'/ devices is a multiple of {k}, or change grad_accum_steps.')
    split = lambda x: x.reshape((k, batch // k) + x.shape[1:])

    def body(carry, xs):
      loss_sum, top1_sum, grad_sum = carry
      i, images_i, labels_i = xs
      loss, top1, grads = micro_step(params, images_i, labels_i,
                                     jax.random.fold_in(rng, i))
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32),
                              grad_sum, grads)
      return (loss_sum + loss.astype(jnp.float32), top1_sum + top1,
              grad_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss, top1, grads), _ = jax.lax.scan(
        body, init, (jnp.arange(k), split(images), split(labels)))
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grads, params)
    return loss / k, top1 / k, grads

  def train_step(state: TrainState, batch: Dict[str, jax.Array],
                 rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    images = batch['images'].astype(compute_dtype)
    labels = batch['labels'].astype(jnp.float32)
    if k == 1:
      loss, top1, grads = micro_step(state.params, images, labels, rng)
    else:
      loss, top1, grads = accumulate(state.params, images, labels, rng)
    grads = _grad_mean(grads)
    loss = _device_mean(loss)
    grad_sq = _squared_norm(grads)
    finite = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_sq))

    def apply(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      opt_state = _agc_totals(opt_state)
      params = optax.apply_updates(state.params, updates)
      ema_params = (optim.ema_update(state.ema_params, params, state.step,
                                     ema_decay) if ema_decay > 0 else params)
      return params, opt_state, ema_params

    def skip(_):
      return state.params, state.opt_state, state.ema_params

    # `finite` is identical on every device (it is computed from pmean'd /
    # psum'd values), so all devices take the same branch.
    params, opt_state, ema_params = jax.lax.cond(finite, apply, skip, None)
    new_state = TrainState(
        params=params, opt_state=opt_state, ema_params=ema_params,
        step=state.step + 1,
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32))
    metrics = {
        'loss': loss,
        'top1': _device_mean(top1),
        'grad_norm': jnp.sqrt(grad_sq),
        'param_norm': (optax.tree.norm(params) if _param_specs() is None
                       else jnp.sqrt(_squared_norm(params))),
        'skipped': 1.0 - finite.astype(jnp.float32),
    }
    if agc_stats and optim.agc_states(opt_state):
      metrics.update(optim.agc_statistics(opt_state, params))
    return new_state, metrics

  return train_step


def make_eval_step(forward: hk.Transformed, compute_dtype=jnp.float32
                   ) -> Callable:
  """Returns eval_step(params, batch) -> per-device sums.

  batch: 'images', 'labels' (int class ids), 'mask' (1 real / 0 padding).
  Sums: top1 and top5 correct, loss (cross-entropy) and count, all masked;
  the caller reduces over devices/hosts and divides by the total count.
  """
  apply = fsdp.apply(forward)

  def eval_step(params, batch):
    logits = apply(params, None,
                           batch['images'].astype(compute_dtype), False)
    logits = logits['logits'].astype(jnp.float32)
    labels = batch['labels'].astype(jnp.int32)
    mask = batch['mask'].astype(jnp.float32)
    top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {'top1': jnp.sum(top1 * mask), 'top5': jnp.sum(top5 * mask),
            'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}

  return eval_step
