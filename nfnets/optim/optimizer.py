"""The NFNet optimizer (Brock et al. 2021, arXiv 2102.06171) as one optax chain.

::

    grads (pmean'd over devices)
      -> AGC, unit-wise, on every leaf but the final classifier's weight
      -> + weight_decay * params, on weights only (not gains / biases / skip_gain)
      -> Nesterov momentum 0.9  (m <- 0.9 m + g;  step = g + 0.9 m)
      -> * -lr(step)            (peak lr = lr * batch / 256 with
                                 lr_scaling='linear', else lr; linear warmup
                                 then cosine to cosine_end_lr)

This is the order of DeepMind's release (SGD_AGC: clip the raw gradient,
then add weight decay, then the momentum buffer, then the learning rate):
clipping comes first because the AGC bound compares the *loss* gradient with
the weights; adding ``wd * W`` first would let the decay term count against
(or be clipped along with) the gradient.

**Schedule length.**  As in the release's experiment configs:
``total_steps = (num_examples * num_epochs) // batch_size`` and the warmup is
``warmup_epochs * num_examples / batch_size`` steps, a float (F0: 1,281,167
images x 360 epochs // 4096 = 112,602 steps, warmup 1,563.92 steps); see
:func:`training_steps`.

**AGC threshold.**  ``agc_clipping`` = 0.01 (the release's value at every
batch size) or ``'by_batch'``, our own table by global batch size B:

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
smaller lambda.  The rows below 4096 are an extrapolation, not paper
numbers: with lr proportional to B, plain SGD+AGC bounds the relative step
of each unit by ``lr * lambda``; keeping that bound at the paper's
``1.6 * 0.01`` gives ``lambda = 0.01 * 4096 / B`` (0.02 at 2048, 0.04 at
1024, 0.08 at 512), which we cap at 0.08 for smaller batches (where AGC
matters little).  Batch sizes between rows round to the *larger* batch,
i.e. the smaller (safer) lambda.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from nfnets import recipes
from nfnets.errors import ConfigError
from nfnets.optim.agc import adaptive_grad_clip
from nfnets.optim.masks import (CLASSIFIER_REGEX, agc_mask, is_classifier,
                                tree_paths, weight_decay_mask)

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


# Fields whose value depends on the model family (NFNet, NF-RegNet, ...) and
# their types: placeholders (None) in the experiment config, filled from the
# family's row of nfnets.recipes by nfnets.config.resolve().
FAMILY_FIELDS = {
    'lr': float,
    'lr_scaling': str,
    'weight_decay': float,
    'use_agc': bool,
    'cosine_end_lr': float,
}
LR_SCALINGS = ('linear', 'none')
BY_BATCH = 'by_batch'


def default_optim_config(family_placeholders: bool = False
                         ) -> ml_collections.ConfigDict:
  """The optimizer settings (``config.optim``); defaults = the NFNet recipe.

  Args:
    family_placeholders: if True, the family-dependent fields
      (``FAMILY_FIELDS``: lr, lr_scaling, weight_decay, use_agc,
      cosine_end_lr) are None placeholders meaning "the model family's
      recipe" (filled by ``nfnets.config.resolve``); the experiment config
      uses this. False: the NFNet values, for direct use of
      :func:`make_optimizer`.
  """
  nfnet = recipes.RECIPES['nfnet']
  c = ml_collections.ConfigDict()
  fam = lambda name: (config_dict.placeholder(FAMILY_FIELDS[name])
                      if family_placeholders else getattr(nfnet, name))
  # Base learning rate. Peak lr = lr * batch / 256 when lr_scaling='linear'
  # (NFNets: 0.1 -> 1.6 at batch 4096), = lr when 'none' (NF-RegNets: 0.4).
  c.lr = fam('lr')
  c.lr_scaling = fam('lr_scaling')  # 'linear' | 'none'
  # Linear warmup from 0 over this many epochs (may be fractional; 0 = none),
  # then cosine decay to cosine_end_lr at total_steps.
  c.warmup_epochs = 5.0
  # The lr the cosine ends at (absolute, not scaled; the release's min_val:
  # 0 for NFNets, 0.001 for NF-RegNets).
  c.cosine_end_lr = fam('cosine_end_lr')
  # SGD momentum coefficient and Nesterov flag.
  c.momentum = 0.9
  c.nesterov = True
  # L2 weight decay added to the (clipped) gradients: g + wd * w. Applied to
  # weights only: gains, biases, skip_gain and other <= 1-D leaves excluded.
  # NFNets 2e-5; NF-RegNets 5e-5 + 1e-5 per B-level.
  c.weight_decay = fam('weight_decay')
  # Whether to use adaptive gradient clipping at all (NF-RegNets: no).
  c.use_agc = fam('use_agc')
  # AGC threshold lambda: a float (0.01, the release's value at every batch
  # size) or 'by_batch' (our extrapolated table by global batch size, see
  # nfnets.optim.optimizer: 0.08 at <= 512 ... 0.01 above 2048).
  c.agc_clipping = config_dict.FieldReference(0.01, field_type=object)
  # AGC's lower bound on parameter norms (lets zero-init params move).
  c.agc_eps = 1e-3
  # Regex (re.search on 'module/path/param' strings) of the final classifier's
  # params: AGC skips its weight (not its bias), and train.freeze_body trains
  # only these. Default: root-level module named exactly 'linear'
  # ('NFNet/~/linear/w' and '/b'; not squeeze_excite/~/linear).
  c.classifier_regex = CLASSIFIER_REGEX
  # Max decay of the parameter EMA; decay(step) = min(ema_decay,
  # (1 + step) / (10 + step)). 0 disables the EMA (used by the train loop).
  c.ema_decay = 0.99999
  # SAM neighbourhood radius (0 = off). SAM is applied by the train step via
  # nfnets.optim.sam_gradients (it changes how grads are computed), not here.
  c.sam_rho = 0.0
  return c


class TrainingSteps(NamedTuple):
  """Schedule lengths: ``total_steps`` (int) and ``steps_per_epoch`` (float)."""
  total_steps: int
  steps_per_epoch: float


def training_steps(num_examples: int, batch_size: int, num_epochs: float,
                   num_steps: Optional[int] = None) -> TrainingSteps:
  """Total optimizer steps and steps per epoch, as the release computes them.

  ``total_steps = (num_examples * num_epochs) // batch_size`` (steps per
  epoch are *not* rounded first) and ``steps_per_epoch = num_examples /
  batch_size`` as a float (the warmup is ``warmup_epochs * steps_per_epoch``
  steps). F0 on ImageNet: 1,281,167 x 360 // 4096 = 112,602 steps,
  312.78 steps/epoch.

  Args:
    num_examples: training examples per epoch.
    batch_size: global batch size.
    num_epochs: epochs (may be fractional); ignored when ``num_steps`` is set.
    num_steps: explicit total steps (``config.train.num_steps``), or None.

  Returns:
    ``TrainingSteps(total_steps, steps_per_epoch)`` for :func:`make_optimizer`.
  """
  if num_examples <= 0 or batch_size <= 0:
    raise ValueError(f'num_examples ({num_examples}) and batch_size '
                     f'({batch_size}) must be positive.')
  steps_per_epoch = num_examples / batch_size
  if num_steps:
    if num_steps < 0:
      raise ValueError(f'num_steps must be positive, got {num_steps}.')
    return TrainingSteps(int(num_steps), steps_per_epoch)
  if not num_epochs or num_epochs <= 0:
    raise ValueError(f'num_epochs must be positive (or give num_steps), got '
                     f'{num_epochs}.')
  total = int(math.floor(num_examples * num_epochs / batch_size))
  if total < 1:
    raise ConfigError(
        f'{num_epochs} epochs of {num_examples} examples at batch {batch_size} '
        'is less than one step; train longer or use a smaller batch.')
  return TrainingSteps(total, steps_per_epoch)


def warmup_cosine_schedule(peak_lr: float, warmup_steps: float,
                           total_steps: int,
                           end_lr: float = 0.0) -> Callable[[Any], Any]:
  """lr(step), the release's WarmupCosineDecay (start value 0).

  ``peak * step / warmup`` for step < warmup (warmup may be fractional), then
  ``end + 0.5 * (peak - end) * (1 + cos(pi * (step - warmup) / (total -
  warmup)))``, ``end`` from ``total_steps`` on.  As in the release, the first
  update (step 0) has lr 0 when there is a warmup.
  """
  if total_steps <= warmup_steps:
    raise ValueError(f'total_steps ({total_steps}) must exceed warmup_steps '
                     f'({warmup_steps}).')
  decay_steps = total_steps - warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = end_lr + 0.5 * (peak_lr - end_lr) * (1.0 + jnp.cos(jnp.pi * frac))
    if warmup_steps == 0:
      return cos
    warm = peak_lr * step / warmup_steps
    return jnp.where(step < warmup_steps, warm, cos)

  return schedule


def _field(cfg: ml_collections.ConfigDict, name: str) -> Any:
  value = cfg[name]
  if value is None and name in FAMILY_FIELDS:
    raise ValueError(
        f'config.optim.{name} is None (a placeholder for the model family\'s '
        'recipe): resolve the config first with nfnets.config.resolve(config, '
        f'num_classes), or set optim.{name} explicitly.')
  return value


def agc_clipping_value(clipping: Any, batch_size: int) -> float:
  """The AGC lambda for ``optim.agc_clipping`` (a float or 'by_batch')."""
  if isinstance(clipping, str):
    if clipping != BY_BATCH:
      raise ValueError(f"config.optim.agc_clipping must be a positive float "
                       f"or '{BY_BATCH}', got {clipping!r}.")
    return agc_clipping_for_batch_size(batch_size)
  if (not isinstance(clipping, numbers.Real) or isinstance(clipping, bool)
      or not clipping > 0):
    raise ValueError(f"config.optim.agc_clipping must be a positive float or "
                     f"'{BY_BATCH}', got {clipping!r}.")
  return float(clipping)


def peak_learning_rate(cfg: Optional[ml_collections.ConfigDict],
                       batch_size: int) -> float:
  """Peak lr: ``lr * batch / 256`` ('linear' scaling) or ``lr`` ('none')."""
  cfg = default_optim_config() if cfg is None else cfg
  scaling = _field(cfg, 'lr_scaling')
  if scaling not in LR_SCALINGS:
    raise ValueError(f'config.optim.lr_scaling must be one of {LR_SCALINGS}, '
                     f'got {scaling!r}.')
  lr = _field(cfg, 'lr')
  return lr * batch_size / 256.0 if scaling == 'linear' else float(lr)


def _freeze_all_but_classifier(tx: optax.GradientTransformation,
                               regex: Optional[str]
                               ) -> optax.GradientTransformation:
  """Only the classifier (``regex``) is trained: the body gets zero updates
  and keeps no optimizer state."""
  if regex is None:
    raise ConfigError('freeze_body=True needs config.optim.classifier_regex '
                      '(the classifier to train); it is None.')

  def labels(params):
    paths = tree_paths(params)
    out = jax.tree.map(
        lambda p: 'train' if is_classifier(p, regex) else 'frozen', paths)
    if 'train' not in jax.tree.leaves(out):
      raise ValueError(
          f'freeze_body=True but classifier_regex {regex!r} matches no leaf '
          f'of the param tree (first paths: {jax.tree.leaves(paths)[:5]}): '
          'nothing would be trained.')
    return out

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)


def make_optimizer(cfg: Optional[ml_collections.ConfigDict] = None,
                   *,
                   batch_size: int,
                   steps_per_epoch: float,
                   total_steps: int,
                   freeze_body: bool = False,
                   ) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Builds the NFNet optimizer (one optax chain) and its lr schedule.

  Args:
    cfg: ``config.optim`` (see :func:`default_optim_config`), read field by
      field (a missing field is an error; resolve placeholders first with
      ``nfnets.config.resolve``).  ``None``: all defaults (NFNet recipe).
    batch_size: the *global* batch size (all devices / hosts).
    steps_per_epoch: optimizer steps per epoch, a float (num_examples /
      batch_size; see :func:`training_steps`); the warmup is
      ``warmup_epochs * steps_per_epoch`` steps, not rounded.
    total_steps: total optimizer steps (the cosine reaches its end there).
    freeze_body: train only the classifier (``cfg.classifier_regex``): the
      body gets zero updates and keeps no optimizer state (fine-tuning).

  Returns:
    ``(tx, lr_schedule)``: ``tx.update(grads, state, params)`` needs params
    (AGC and weight decay use them); feed it gradients already averaged over
    devices.  ``lr_schedule(step)`` gives the lr used for update ``step``
    (0-based), e.g. for logging.  ``cfg.sam_rho`` is not used here: the
    training step applies SAM via :func:`nfnets.optim.sam_gradients`.

  The chain is ``masked(AGC) -> masked(add_decayed_weights) ->
  trace(momentum, nesterov) -> scale_by_learning_rate``; see the module
  docstring for the order, the schedule and the AGC threshold.
  """
  cfg = default_optim_config() if cfg is None else cfg
  if batch_size <= 0 or steps_per_epoch <= 0 or total_steps <= 0:
    raise ValueError('batch_size, steps_per_epoch and total_steps must be '
                     f'positive; got {batch_size}, {steps_per_epoch}, '
                     f'{total_steps}.')
  peak_lr = peak_learning_rate(cfg, batch_size)
  warmup_steps = float(cfg.warmup_epochs) * float(steps_per_epoch)
  if warmup_steps >= total_steps:
    raise ConfigError(
        f'warmup ({warmup_steps:g} steps = optim.warmup_epochs '
        f'{cfg.warmup_epochs} x {steps_per_epoch:g} steps/epoch) must be '
        f'shorter than training ({total_steps} steps); lower '
        'optim.warmup_epochs or train longer.')
  lr_schedule = warmup_cosine_schedule(peak_lr, warmup_steps, total_steps,
                                       float(_field(cfg, 'cosine_end_lr')))

  parts = []
  if _field(cfg, 'use_agc'):
    clipping = agc_clipping_value(cfg.agc_clipping, batch_size)
    regex = cfg.classifier_regex
    parts.append(optax.masked(
        adaptive_grad_clip(clipping, eps=cfg.agc_eps),
        lambda p: agc_mask(p, classifier_regex=regex)))
  wd = _field(cfg, 'weight_decay')
  if wd:
    parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
  if cfg.momentum:
    parts.append(optax.trace(decay=cfg.momentum, nesterov=bool(cfg.nesterov)))
  parts.append(optax.scale_by_learning_rate(lr_schedule))
  tx = optax.chain(*parts)
  if freeze_body:
    tx = _freeze_all_but_classifier(tx, cfg.classifier_regex)
  return tx, lr_schedule
