"""What a run is made of, built from its config: `build(config) -> Setup`.

Shared by the training loop (nfnets.training.loop) and scripts/benchmark.py;
imports no TensorFlow (the data pipeline is only asked for the train split's
size, and only when the caller does not pass it).
"""
import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, Optional

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets import models
from nfnets import optim
from nfnets.training import hardware
from nfnets.training import parallel
from nfnets.training import state as state_lib
from nfnets.training import step as step_lib


@dataclasses.dataclass
class Setup:
  """Everything the loop needs besides data and devices.

  Attributes:
    forward: hk.transform of the model.
    tx: the optimizer.
    lr_fn: step -> learning rate.
    state: the initial host TrainState (fresh or fine-tuning init).
    meta: what a checkpoint of this run records (model, classes).
    train_step: per-device train_step(state, batch, rng) (nfnets.training.step).
    eval_step: per-device eval_step(params, batch) -> sums.
    rng: the root rng of the train steps (host array).
    compute_dtype: the forward/backward dtype.
    batch_size: global batch per optimizer step.
    steps_per_epoch: optimizer steps per epoch.
    total_steps: optimizer steps of the run.
    flops_per_image: training FLOPs per image (3 x 2 x forward MACs).
  """
  forward: hk.Transformed
  tx: optax.GradientTransformation
  lr_fn: Callable[[int], Any]
  state: state_lib.TrainState
  meta: Dict[str, Any]
  train_step: Callable
  eval_step: Callable
  rng: np.ndarray
  compute_dtype: Any
  batch_size: int
  steps_per_epoch: int
  total_steps: int
  flops_per_image: float


def resolve_compute_dtype(name: str):
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def _freeze_body(tx, regex: str):
  """Trains only the classifier (paths matching regex); the body gets zero
  updates and keeps no optimizer state."""
  def labels(params):
    return jax.tree.map(
        lambda path: 'train' if optim.is_classifier(path, regex) else 'frozen',
        optim.tree_paths(params))
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               labels)


def init_params(config, forward: hk.Transformed, rng: jax.Array):
  """The model's initial params (host), or config.init.checkpoint's merged in
  (nfnets.checkpoints.init_from_checkpoint: the one fine-tuning path)."""
  size = config.data.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  params = jax.device_get(jax.jit(lambda r: forward.init(r, dummy, True))(rng))
  if config.init.checkpoint:
    from nfnets import checkpoints  # pylint: disable=g-import-not-at-top
    params = checkpoints.init_from_checkpoint(
        params, config.init.checkpoint, variant=config.model.name,
        which=config.init.params,
        reset_classifier=config.init.reset_classifier,
        model_kwargs=dict(config.model.kwargs))
    logging.info('Initialised from %s (%s params%s).', config.init.checkpoint,
                 config.init.params, ', classifier re-initialised'
                 if config.init.reset_classifier else '')
  return params


def build(config, *, num_train_examples: Optional[int] = None,
          abstract: bool = False) -> Setup:
  """Model, optimizer, schedule, initial state and steps of a config.

  Args:
    config: an experiment config (nfnets.config.base_config).
    num_train_examples: size of config.data.train_split; default: asked
      from the data pipeline (which imports TensorFlow).
    abstract: state as jax.ShapeDtypeStructs (no initialisation, no
      fine-tuning checkpoint read), e.g. to compile for memory analysis.
  """
  compute_dtype = resolve_compute_dtype(config.model.compute_dtype)
  model_kwargs = dict(config.model.kwargs)
  forward = models.forward_fn(config.model.name, config.model.num_classes,
                              **model_kwargs)
  if num_train_examples is None:
    from nfnets import data  # pylint: disable=g-import-not-at-top
    num_train_examples = data.num_examples(config.data,
                                           config.data.train_split)
  batch_size = config.train.batch_size
  steps_per_epoch = max(1, num_train_examples // batch_size)
  total_steps = config.train.num_steps or int(
      math.ceil(config.train.num_epochs * steps_per_epoch))
  tx, lr_fn = optim.make_optimizer(config.optim, batch_size=batch_size,
                                   steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps)
  # FREEZE-BODY CALL SITE (the only one): moves into optim.make_optimizer
  # (its freeze_body argument) once the optimizer owns it.
  if config.train.freeze_body:
    tx = _freeze_body(tx, config.optim.classifier_regex)

  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if abstract:
    size = config.data.image_size
    dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    state = jax.eval_shape(lambda r, x: state_lib.create(
        forward.init(r, x, True), tx), init_rng, dummy)
  else:
    state = state_lib.create(init_params(config, forward, init_rng), tx)
  macs = models.count_flops(config.model.name, config.data.image_size,
                            config.model.num_classes, **model_kwargs)
  return Setup(
      forward=forward, tx=tx, lr_fn=lr_fn, state=state,
      meta={'model': config.model.name,
            'num_classes': config.model.num_classes},
      train_step=step_lib.make_train_step(
          forward, tx, compute_dtype=compute_dtype,
          ema_decay=config.optim.ema_decay, sam_rho=config.optim.sam_rho),
      eval_step=step_lib.make_eval_step(forward, compute_dtype),
      rng=np.asarray(jax.device_get(step_rng)), compute_dtype=compute_dtype,
      batch_size=batch_size, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      flops_per_image=hardware.train_flops_per_image(macs))


@jax.jit
def add_trees(a, b):
  """Sums two pytrees on device (one dispatch for all leaves)."""
  return jax.tree.map(jnp.add, a, b)


def evaluate(dp: parallel.DataParallel, eval_fn: Callable, params: Any,
             batches: Iterable[Dict[str, np.ndarray]], *, prefetch: int = 2,
             on_batch: Optional[Callable[[int, Any], None]] = None
             ) -> Dict[str, float]:
  """Sums eval_fn (dp.eval_step of nfnets.training.step.make_eval_step) over
  host batches; returns the global totals 'top1', 'top5', 'loss', 'count'.

  on_batch(i, device_totals) is called after each batch (for progress).
  """
  totals = None
  for i, batch in enumerate(dp.put_batch(batches, prefetch)):
    sums = eval_fn(params, batch)
    totals = sums if totals is None else add_trees(totals, sums)
    if on_batch is not None:
      on_batch(i, totals)
  if totals is None:
    raise ValueError('the eval split yielded no batches.')
  return {k: float(v) for k, v in dp.fetch(totals).items()}


def due(step: int, every: int) -> bool:
  """Whether a periodic action with period `every` (0: never) runs at step."""
  return bool(every) and step % every == 0
