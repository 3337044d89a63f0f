"""The NFNet optimizer recipe (Brock et al. 2021, arXiv 2102.06171) as one optax chain.

::

    grads (pmean'd over devices)
      -> AGC, unit-wise, on every leaf but the final classifier
      -> + weight_decay * params, on weights only (not gains / biases / skip_gain)
      -> Nesterov momentum 0.9  (m <- 0.9 m + g;  step = g + 0.9 m)
      -> * -lr(step)            (lr = lr_per_256 * batch / 256,
                                 linear warmup then cosine to 0)

This is the order of DeepMind's release (SGD_AGC: clip the raw gradient,
then add weight decay, then the momentum buffer, then the learning rate):
clipping comes first because the AGC bound compares the *loss* gradient with
the weights; adding ``wd * W`` first would let the decay term count against
(or be clipped along with) the gradient.

AGC clipping threshold by global batch size (used when
``cfg.agc_clipping`` is None; an explicit value always wins):

=================  =========
global batch B     lambda
=================  =========
B <= 512           0.08
512 < B <= 1024    0.04
1024 < B <= 2048   0.02
B > 2048           0.01
=================  =========

The paper fixes lambda = 0.01 at batch 4096 (its ImageNet setting) and
reports (Fig. 3 ablation over batch 256..4096) that larger batches need
smaller lambda.  Our rows below 4096 are an extrapolation, not paper
numbers: with lr proportional to B, plain SGD+AGC bounds the relative step
of each unit by ``lr * lambda``; keeping that bound at the paper's
``1.6 * 0.01`` gives ``lambda = 0.01 * 4096 / B`` (0.02 at 2048, 0.04 at
1024, 0.08 at 512), which we cap at 0.08 for smaller batches (where AGC
matters little).  Batch sizes between rows round to the *larger* batch,
i.e. the smaller (safer) lambda.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax.numpy as jnp
import ml_collections
import optax

from nfnets.optim.agc import adaptive_grad_clip
from nfnets.optim.masks import CLASSIFIER_REGEX, agc_mask, weight_decay_mask

# (max global batch size, clipping); the last row covers every larger batch.
AGC_CLIPPING_TABLE = ((512, 0.08), (1024, 0.04), (2048, 0.02),
                      (math.inf, 0.01))


def agc_clipping_for_batch_size(batch_size: int) -> float:
  """AGC lambda for a global batch size (see the module docstring)."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  for max_batch, clipping in AGC_CLIPPING_TABLE:
    if batch_size <= max_batch:
      return clipping
  raise AssertionError('unreachable')


def default_optim_config() -> ml_collections.ConfigDict:
  """The paper's optimizer settings (``config.optim``)."""
  c = ml_collections.ConfigDict()
  # Peak learning rate per 256 examples; peak lr = lr_per_256 * batch / 256
  # (1.6 at the paper's batch 4096).
  c.lr_per_256 = 0.1
  # Linear warmup from 0 over this many epochs (may be fractional; 0 = none),
  # then cosine decay to 0 at total_steps.
  c.warmup_epochs = 5.0
  # SGD momentum coefficient and Nesterov flag.
  c.momentum = 0.9
  c.nesterov = True
  # L2 weight decay added to the (clipped) gradients: g + wd * w. Applied to
  # weights only: gains, biases, skip_gain and other <= 1-D leaves excluded.
  c.weight_decay = 2e-5
  # Whether to use adaptive gradient clipping at all.
  c.use_agc = True
  # AGC threshold lambda; None -> from the batch-size table
  # (agc_clipping_for_batch_size: 0.01 at batch >= 4096).
  c.agc_clipping = ml_collections.config_dict.placeholder(float)
  # AGC's lower bound on parameter norms (lets zero-init params move).
  c.agc_eps = 1e-3
  # Regex (re.search on 'module/path/param' strings) of the final classifier,
  # which is excluded from AGC. Default: root-level module named exactly
  # 'linear' ('NFNet/~/linear/w' and '/b'; not squeeze_excite/~/linear).
  c.classifier_regex = CLASSIFIER_REGEX
  # Max decay of the parameter EMA; decay(step) = min(ema_decay,
  # (1 + step) / (10 + step)). 0 disables the EMA (used by the train loop).
  c.ema_decay = 0.99999
  # SAM neighbourhood radius (0 = off). SAM is applied by the train step via
  # nfnets.optim.sam_gradients (it changes how grads are computed), not here.
  c.sam_rho = 0.0
  return c


def warmup_cosine_schedule(peak_lr: float, warmup_steps: int,
                           total_steps: int) -> Callable[[Any], Any]:
  """lr(step): ``peak * step / warmup`` for step < warmup, then
  ``0.5 * peak * (1 + cos(pi * (step - warmup) / (total - warmup)))``,
  0 from ``total_steps`` on.  As in the release, the first update (step 0)
  has lr 0 when there is a warmup."""
  if total_steps <= warmup_steps:
    raise ValueError(f'total_steps ({total_steps}) must exceed warmup_steps '
                     f'({warmup_steps}).')
  decay_steps = total_steps - warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    cos = 0.5 * peak_lr * (1.0 + jnp.cos(
        jnp.pi * jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)))
    if warmup_steps == 0:
      return cos
    warm = peak_lr * step / warmup_steps
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


_DEFAULTS = default_optim_config()


def _get(cfg: Any, name: str) -> Any:
  if cfg is None:
    return _DEFAULTS[name]
  try:
    return cfg[name] if name in cfg else _DEFAULTS[name]
  except TypeError:  # plain object with attributes
    return getattr(cfg, name, _DEFAULTS[name])


def make_optimizer(cfg: Optional[Any] = None,
                   *,
                   batch_size: int,
                   steps_per_epoch: int,
                   total_steps: int,
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Builds the NFNet optimizer (one optax chain) and its lr schedule.

  Args:
    cfg: ``config.optim`` (see :func:`default_optim_config`); missing fields
      take the defaults.  ``None``: all defaults.
    batch_size: the *global* batch size (all devices / hosts).
    steps_per_epoch: optimizer steps per epoch (for the warmup length).
    total_steps: total optimizer steps (the cosine reaches 0 there).

  Returns:
    ``(tx, lr_schedule)``: ``tx.update(grads, state, params)`` needs params
    (AGC and weight decay use them); feed it gradients already averaged over
    devices.  ``lr_schedule(step)`` gives the lr used for update ``step``
    (0-based), e.g. for logging.  ``cfg.sam_rho`` is not used here: the
    training step applies SAM via :func:`nfnets.optim.sam_gradients`.

  The chain is ``masked(AGC) -> masked(add_decayed_weights) ->
  trace(momentum, nesterov) -> scale_by_learning_rate``; see the module
  docstring for the order and the AGC batch-size table.
  """
  if batch_size <= 0 or steps_per_epoch <= 0 or total_steps <= 0:
    raise ValueError('batch_size, steps_per_epoch and total_steps must be '
                     f'positive; got {batch_size}, {steps_per_epoch}, '
                     f'{total_steps}.')
  peak_lr = _get(cfg, 'lr_per_256') * batch_size / 256.0
  warmup_steps = int(round(_get(cfg, 'warmup_epochs') * steps_per_epoch))
  if warmup_steps >= total_steps:
    raise ValueError(f'warmup ({warmup_steps} steps) must be shorter than '
                     f'training ({total_steps} steps).')
  lr_schedule = warmup_cosine_schedule(peak_lr, warmup_steps, total_steps)

  parts = []
  if _get(cfg, 'use_agc'):
    clipping = _get(cfg, 'agc_clipping')
    if clipping is None:
      clipping = agc_clipping_for_batch_size(batch_size)
    regex = _get(cfg, 'classifier_regex')
    parts.append(optax.masked(
        adaptive_grad_clip(clipping, eps=_get(cfg, 'agc_eps')),
        lambda p: agc_mask(p, classifier_regex=regex)))
  wd = _get(cfg, 'weight_decay')
  if wd:
    parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
  momentum = _get(cfg, 'momentum')
  if momentum:
    parts.append(optax.trace(decay=momentum,
                             nesterov=bool(_get(cfg, 'nesterov'))))
  parts.append(optax.scale_by_learning_rate(lr_schedule))
  return optax.chain(*parts), lr_schedule
