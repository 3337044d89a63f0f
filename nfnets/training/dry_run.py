"""What a config will run, without running it (`python -m nfnets.train
--dry_run`): the resolved config and the model's parameters and FLOPs.

The model is only traced (jax.eval_shape / make_jaxpr): no parameter is
allocated and nothing is compiled. The dataset is read when it is available
here (class count, splits, schedule length); a tfds dataset that is not
prepared on this machine is named, and the classes are then model.num_classes
or 1000.
"""
import math

import jax
import jax.numpy as jnp

from nfnets import config as config_lib
from nfnets import errors
from nfnets import models
from nfnets import optim
from nfnets.models import flops as flops_lib
from nfnets.training import hardware
from nfnets.training import setup


def _data_lines(config):
  """(resolved config, lines about the dataset and the schedule)."""
  from nfnets import data  # pylint: disable=g-import-not-at-top
  try:
    prepared = setup.prepare(config)
  except data.DatasetNotPreparedError as e:
    classes = config.model.num_classes or 1000
    resolved = config_lib.resolve(config, classes)
    first = errors.one_line(e).split('. ')[0]
    return resolved, [
        f'data: {first}; assuming {classes} classes and splits '
        f'{resolved.data.train_split!r} / {resolved.data.eval_split!r}.']
  c = prepared.config
  steps = optim.training_steps(prepared.num_train_examples,
                               c.train.batch_size, c.train.num_epochs,
                               c.train.num_steps)
  return c, [
      f'data: {prepared.source.name}, {c.model.num_classes} classes; train '
      f'{c.data.train_split!r} ({prepared.num_train_examples:,} examples), '
      f'eval {c.data.eval_split!r} ({prepared.num_eval_examples:,} examples)',
      f'schedule: {steps.total_steps:,} steps ({steps.steps_per_epoch:.1f} '
      f'steps/epoch), warmup {c.optim.warmup_epochs:g} epochs']


def model_size(config, image_sizes):
  """(params, [forward multiply-adds per image at each size]) of a resolved
  config's model, from shapes only (an abstract rng key: nothing runs)."""
  kwargs = dict(config_lib.model_kwargs(config), conv_lowering='xla')
  fwd = models.forward_fn(config.model.name, config.model.num_classes,
                          **kwargs)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  images = lambda s: jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  params = jax.eval_shape(lambda k, x: fwd.init(k, x, False), key,
                          images(image_sizes[0]))
  count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  macs = [flops_lib.jaxpr_macs(jax.make_jaxpr(
      lambda p, x: fwd.apply(p, None, x, False))(params, images(s)).jaxpr)
          for s in image_sizes]
  return count, macs


def summary(config) -> str:
  """The resolved `config` and the size of its model, as text.

  Raises:
    nfnets.errors.UserError: as a training run would at start-up.
  """
  config_lib.validate(config)
  resolved, lines = _data_lines(config)
  config_lib.validate(resolved)
  c = resolved
  params, (train_macs, eval_macs) = model_size(
      c, (c.data.image_size, c.data.eval_image_size))
  train_flops = hardware.train_flops_per_image(train_macs)
  lines = [config_lib.describe(c)] + lines + [
      f'model: {c.model.name}, {params / 1e6:.2f} M params; '
      f'{train_macs / 1e9:.4g} GFLOPs (multiply-adds, the paper\'s count) '
      f'per {c.data.image_size} px image, {eval_macs / 1e9:.4g} at the eval '
      f'size {c.data.eval_image_size} px; training '
      f'{train_flops * c.train.batch_size / 1e12:.4g} TFLOPs per step '
      f'(batch {c.train.batch_size})',
      'resolved config:', str(c).rstrip()]
  return '\n'.join(lines)
