"""What a run is made of, built from its config: `prepare(config) -> Data`
(the dataset, read once, and the resolved config, checked before anything
compiles) and `build(config) -> Setup`.

Shared by the training loop (nfnets.training.loop) and scripts/benchmark.py;
imports no TensorFlow unless the data source is asked for.
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Iterable, Optional

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets import config as config_lib
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
    config: the resolved config (nfnets.config.resolve: every placeholder
      filled from the variant, its family's recipe and the dataset).
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
    steps_per_epoch: optimizer steps per epoch (examples / batch, a float).
    total_steps: optimizer steps of the run.
    flops_per_image: training FLOPs per image (3 x 2 x forward MACs).
  """
  config: Any
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
  steps_per_epoch: float
  total_steps: int
  flops_per_image: float


@dataclasses.dataclass
class Data:
  """A config resolved against its dataset.

  Attributes:
    config: the resolved config (classes, splits, sizes, recipe).
    source: the dataset (nfnets.data.get_source), built once per run and
      passed to the iterators.
    num_train_examples: size of config.data.train_split.
    num_eval_examples: size of config.data.eval_split.
  """
  config: Any
  source: Any
  num_train_examples: int
  num_eval_examples: int


def prepare(config, source: Any = None) -> Data:
  """Reads the dataset once and resolves `config` against it, so that every
  mistake a user can fix is found before anything is compiled.

  Raises:
    nfnets.errors.UserError: no such dataset, image folder or split; a class
      count that does not match; an invalid config value; a missing
      init.checkpoint.
  """
  from nfnets import data  # pylint: disable=g-import-not-at-top
  source = source or data.get_source(config.data)
  splits = (config.data.train_split or 'train', config.data.eval_split)
  if splits[1] is None:
    splits = (splits[0], data.default_splits(source)[1])
  resolved = config_lib.resolve(
      config, data.num_classes(config.data, source=source), splits)
  n_train = data.check_split(source, resolved.data.train_split, 'train_split')
  n_eval = data.check_split(source, resolved.data.eval_split, 'eval_split')
  path = resolved.init.checkpoint
  if path and not os.path.exists(os.path.expanduser(path)):
    from nfnets.checkpoints import CheckpointError  # pylint: disable=g-import-not-at-top
    raise CheckpointError(
        f'config.init.checkpoint: {path} does not exist. Give a released '
        'F*_haiku.npz, a .npz, or a workdir / checkpoint dir of a run.')
  return Data(resolved, source, n_train, n_eval)


def resolve_compute_dtype(name: str):
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def init_params(config, forward: hk.Transformed, rng: jax.Array):
  """The model's initial params (host), or config.init.checkpoint's merged in
  (nfnets.checkpoints.init_from_checkpoint: the one fine-tuning path)."""
  size = config.data.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  params = models.init_params(forward, rng, dummy)
  if config.init.checkpoint:
    from nfnets import checkpoints  # pylint: disable=g-import-not-at-top
    params = checkpoints.init_from_checkpoint(
        params, config.init.checkpoint, variant=config.model.name,
        which=config.init.params,
        reset_classifier=config.init.reset_classifier,
        model_kwargs=config_lib.model_kwargs(config))
    logging.info('Initialised from %s (%s params%s).', config.init.checkpoint,
                 config.init.params, ', classifier re-initialised'
                 if config.init.reset_classifier else '')
  return params


def _with_augmentation(data_config, train_step):
  """With data.augment_on='device' the step first augments its raw batch
  (nfnets/data/device_augment.py)."""
  if data_config.get('augment_on', 'host') == 'host':
    return train_step
  from nfnets.data import device_augment  # pylint: disable=g-import-not-at-top
  return device_augment.with_batch_transform(
      train_step, device_augment.make_batch_transform(data_config))


def build(config, *, num_train_examples: Optional[int] = None,
          data_num_classes: Optional[int] = None,
          abstract: bool = False) -> Setup:
  """Model, optimizer, schedule, initial state and steps of a config.

  Args:
    config: an experiment config (nfnets.config.base_config); placeholders
      are resolved here (`Setup.config` is the resolved copy).
    num_train_examples: size of config.data.train_split; default: asked
      from the dataset (`prepare`, which imports TensorFlow).
    data_num_classes: the dataset's class count; default: model.num_classes
      when set, else asked from the dataset. With both given (and no
      dataset read), unset splits become 'train' / 'validation'.
    abstract: state as jax.ShapeDtypeStructs (no initialisation, no
      fine-tuning checkpoint read), e.g. to compile for memory analysis.
  """
  if data_num_classes is None:
    data_num_classes = config.model.num_classes
  if data_num_classes is None or num_train_examples is None:
    prepared = prepare(config)
    config = prepared.config
    num_train_examples = prepared.num_train_examples
  else:
    config = config_lib.resolve(config, data_num_classes)
  compute_dtype = resolve_compute_dtype(config.model.compute_dtype)
  eval_dtype = (compute_dtype if config.model.eval_compute_dtype == 'auto'
                else jnp.dtype(config.model.eval_compute_dtype))
  model_kwargs = config_lib.model_kwargs(config)
  forward = models.forward_fn(config.model.name, config.model.num_classes,
                              **model_kwargs)
  batch_size = config.train.batch_size
  total_steps, steps_per_epoch = optim.training_steps(
      num_train_examples, batch_size, config.train.num_epochs,
      config.train.num_steps)
  tx, lr_fn = optim.make_optimizer(config.optim, batch_size=batch_size,
                                   steps_per_epoch=steps_per_epoch,
                                   total_steps=total_steps,
                                   freeze_body=config.train.freeze_body)

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
      config=config, forward=forward, tx=tx, lr_fn=lr_fn, state=state,
      meta={'model': config.model.name,
            'num_classes': config.model.num_classes},
      train_step=_with_augmentation(config.data, step_lib.make_train_step(
          forward, tx, compute_dtype=compute_dtype,
          ema_decay=config.optim.ema_decay, sam_rho=config.optim.sam_rho,
          grad_accum_steps=config.train.grad_accum_steps,
          agc_stats=config.optim.agc_stats)),
      eval_step=step_lib.make_eval_step(forward, eval_dtype),
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
