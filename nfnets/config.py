"""The base experiment config, its resolution and its validation.

Every experiment in configs/ is a `get_config()` built from `base_config()`
(every knob declared and commented here) and then locked, so that a misspelt
override fails. Knobs whose default depends on the model are None
placeholders ("the variant's / family's / dataset's default"); the training
loop fills them with `resolve(config, data_num_classes)` from the variant
table (`nfnets.models.variants`: image sizes, RandAugment, dropout) and the
family's recipe (`nfnets.recipes`: batch, epochs, lr, weight decay, AGC, ...),
so `--config.model.name=F3` trains F3 at F3's sizes and RandAugment level,
and `--config.model.name=nf_regnet_b3` with the NF-RegNet recipe. A value
set in the config file or on the command line always wins.

The NFNet recipe is arXiv 2102.06171 (Sec. 4 and Appendix) as run by
DeepMind's release (`nfnets/experiment_nfnets.py`).
"""
import copy
import inspect
import math
from typing import Any, Dict, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from nfnets import models
from nfnets import recipes
from nfnets.errors import ConfigError
from nfnets.optim import BY_BATCH, LR_SCALINGS, default_optim_config
from nfnets.optim import optimizer as optim_lib

# Model constructor overrides (nfnets.models.build(**kwargs)); None = the
# variant's / family's default. Not every family takes every one (e.g.
# final_conv_mult and use_two_convs are NFNet's, expansion NF-RegNet's);
# validate() names the ones a family does not take.
MODEL_KWARGS = {
    'width': float,  # multiplier on the stage widths
    'depth': tuple,  # blocks per stage, e.g. (1, 1, 1, 1)
    'group_size': int,  # channels per group of the 3x3 convs
    'se_ratio': float,  # squeeze-excite hidden ratio
    'alpha': float,  # residual branch scale
    'stochdepth_rate': float,  # last block's drop rate (NFNet 0.25, others 0.1)
    'drop_rate': float,  # dropout before the classifier (variant table)
    'activation': str,  # scaled nonlinearity ('gelu', 'relu', 'silu', ...)
    'final_conv_mult': float,  # NFNet: final 1x1 conv = mult x last width
    'use_two_convs': bool,  # NFNet: two grouped 3x3 convs per block
    'expansion': float,  # NF-RegNet: inverted-bottleneck expansion
    # How convolutions are lowered: None = the backend's default, 'xla' = one
    # XLA convolution, 'cpu' = the XLA:CPU-friendly lowering of grouped convs.
    'conv_lowering': str,
    'remat': bool,  # recompute block activations in the backward pass
}
CONV_LOWERINGS = ('xla', 'cpu')
COMPUTE_DTYPES = ('auto', 'float32', 'bfloat16')
LOG_LEVELS = ('debug', 'info', 'warning', 'error')
BACKENDS = ('pmap', 'jit')


def base_config(variant: str = 'F0') -> ml_collections.ConfigDict:
  """Every knob, commented; defaults = the variant's family recipe.

  Args:
    variant: the model (`model.name`); every per-variant value stays a
      placeholder, so a later `model.name` override brings its own sizes,
      RandAugment, dropout and family recipe (see `resolve`).
  """
  spec = models.get_variant(variant)
  ph = config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random stream (init, dropout, data order)

  c.model = ml_collections.ConfigDict()
  c.model.name = spec.name  # any of nfnets.models.variants()
  c.model.num_classes = ph(int)  # None: the dataset's class count
  c.model.kwargs = ml_collections.ConfigDict(
      {name: ph(kind) for name, kind in MODEL_KWARGS.items()})
  # Compute dtype of forward/backward: 'bfloat16' on accelerators (params
  # and optimizer state stay float32), 'float32' on CPU. 'auto' = bf16
  # unless the backend is CPU.
  c.model.compute_dtype = 'auto'
  # Compute dtype of evaluation: 'float32' | 'bfloat16' | 'auto' (= the same
  # as compute_dtype).
  c.model.eval_compute_dtype = 'float32'

  c.data = ml_collections.ConfigDict()
  # Any TFDS builder name ('imagenet2012', 'imagenette', ...), 'folder'
  # (class-per-subfolder images under data_dir), 'digits' (embedded, no
  # download) or 'fake' (random images, for benchmarks).
  c.data.name = 'imagenet2012'
  c.data.data_dir = ph(str)  # None: TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.image_key = ph(str)  # feature holding the image; None: auto
  c.data.label_key = ph(str)  # feature holding the label; None: auto
  # Splits in tfds slicing syntax; None: the dataset's (tfds: 'train' and
  # 'validation', else 'test'; folder: 'train' and 'val'). A dataset with
  # only a train split needs both set, e.g. 'train[:90%]' / 'train[90%:]'.
  # ImageNet's held-out protocol: 'train[10000:]' / 'train[:10000]'.
  c.data.train_split = ph(str)
  c.data.eval_split = ph(str)
  c.data.image_size = ph(int)  # training px; None: the variant's
  c.data.eval_image_size = ph(int)  # evaluation px; None: the variant's
  # RandAugment level, '405' = 4 layers, magnitude 5; '' = off; None = the
  # variant's (NFNets) / none (NF-RegNets, NF-ResNets).
  c.data.randaug = ph(str)
  # Magnitude -> op argument mapping: 'release' (the TF-TPU autoaugment.py
  # the release used, quirks included) | 'increasing'.
  c.data.randaug_mode = 'release'
  # RandAugment before (True) or after (False, the release) MixUp/CutMix.
  c.data.augment_before_mix = False
  c.data.mixup_alpha = ph(float)  # MixUp Beta(a, a); 0 = off; None: family's
  c.data.cutmix = ph(bool)  # half of each batch CutMix; None: family's
  c.data.label_smoothing = 0.1
  c.data.resize_method = 'bicubic'
  c.data.shuffle_buffer = ph(int)  # examples; None: 10 x per-host batch
  c.data.num_chunks = 0  # epoch-order chunks per host; 0: n // 10000 in [1, 64]
  c.data.cache = False  # cache raw records in memory
  c.data.dtype = 'float32'  # host image dtype ('bfloat16' halves transfer)
  # Where MixUp/CutMix, RandAugment, label smoothing and normalisation run:
  # 'device' (JAX, first thing in the train step; the host ships uint8 raw
  # images + the random draws) or 'host' (tf.data). Same batches either way.
  c.data.augment_on = 'device'
  c.data.xla = True  # fuse the per-pixel batch work (mixing, normalising) with XLA
  c.data.digits_pad = 2  # 'digits': pad-and-random-crop pixels
  c.data.fake_train_examples = ph(int)  # 'fake': None = 1,281,167
  c.data.fake_eval_examples = ph(int)  # 'fake': None = 50,000
  c.data.num_classes = c.model.get_ref('num_classes')

  c.optim = default_optim_config(family_placeholders=True)
  # Log AGC's clipping statistics as train/agc/* (fraction of units clipped
  # and mean clip factor, overall and per stem / stage / head; read from
  # AGC's optimizer state, no extra pass over the gradients).
  c.optim.agc_stats = True

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = ph(int)  # global (all devices, hosts); None: family's
  c.train.num_epochs = ph(float)  # None: the family's
  c.train.num_steps = ph(int)  # overrides num_epochs
  c.train.eval_batch_size = 1024  # global; the last batch is padded
  c.train.log_every_steps = 100  # metrics fetched from devices only here
  # Host<->device sync at least this often (CPU collectives deadlock when
  # too many steps are in flight); <= log_every_steps.
  c.train.sync_every_steps = 20
  c.train.eval_every_steps = 10_000  # 0: only at the end
  c.train.checkpoint_every_steps = 1000  # 0: only at the end
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  # Stop with an error after this many consecutive non-finite steps (each
  # such step is skipped: params, optimizer state and EMA unchanged).
  c.train.max_nonfinite_steps = 10
  c.train.freeze_body = False  # train only the classifier (fine-tuning)
  c.train.prefetch = 2  # batches prefetched to device
  # Micro-batches per step: each device's batch is split in k, gradients
  # averaged, then one AGC / weight decay / momentum / EMA update.
  c.train.grad_accum_steps = 1
  # Console: the lowest level of *library* messages shown (orbax, tfds,
  # TensorFlow, jax): 'debug' | 'info' | 'warning' | 'error'. Our own
  # progress lines are always shown. 'warning' hides library INFO chatter.
  c.train.log_level = 'warning'

  c.parallel = ml_collections.ConfigDict()
  # 'pmap' (one replica per device) | 'jit' (jit + shard_map over a mesh of
  # all devices; needed for fsdp).
  c.parallel.backend = 'pmap'
  c.parallel.fsdp = False  # 'jit' only: shard params, optimizer state, EMA

  c.init = ml_collections.ConfigDict()
  # Start from weights: a released F*_haiku.npz, a safe .npz, or one of our
  # workdirs/checkpoint dirs. None: random initialisation.
  c.init.checkpoint = ph(str)
  c.init.params = 'ema'  # which params of our own checkpoints: 'ema' | 'raw'
  c.init.reset_classifier = False  # re-initialise the classifier (new task)

  c.distributed = ml_collections.ConfigDict()
  # Multi-host: call jax.distributed.initialize(). 'auto': only when the
  # coordinator is given (here or in env) or on TPU pods/SLURM.
  c.distributed.initialize = 'auto'
  c.distributed.coordinator_address = ph(str)
  c.distributed.num_processes = ph(int)
  c.distributed.process_id = ph(int)
  return c


def use_demo_model(config: ml_collections.ConfigDict) -> None:
  """configs/demo.py's model: F0 at 1/8 width (stages 32/64/192/192
  channels), one block per stage, groups of 16 channels, float32."""
  config.model.name = 'F0'
  config.model.kwargs.width = 0.125
  config.model.kwargs.depth = (1, 1, 1, 1)
  config.model.kwargs.group_size = 16
  config.model.kwargs.stochdepth_rate = 0.0
  config.model.kwargs.drop_rate = 0.1
  config.model.compute_dtype = 'float32'


def use_digits(config: ml_collections.ConfigDict) -> None:
  """The embedded digits dataset (10 classes, 32 px, no download), without
  RandAugment / MixUp / CutMix (the pipeline's random crop only), at batch
  64 with weight decay 5e-5 and the AGC threshold for that batch (0.08).
  model.num_classes and the splits stay unset: they follow the dataset (10
  classes, 'train' / 'test' here), so --config.data.name=... points the same
  config at other data."""
  config.data.name = 'digits'
  config.data.image_size = 32
  config.data.eval_image_size = 32
  config.data.randaug = ''
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.data.label_smoothing = 0.1
  config.data.shuffle_buffer = 2000
  config.optim.weight_decay = 5e-5
  config.optim.agc_clipping = BY_BATCH  # 0.08 at batch 64
  config.train.batch_size = 64
  config.train.eval_batch_size = 200
  config.train.sync_every_steps = 10


def model_kwargs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The model constructor overrides that are set (not None)."""
  return {k: v for k, v in config.model.kwargs.items() if v is not None}


def _get_path(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for name in path.split('.'):
    node = node[name]
  return node


def _set_path(config: ml_collections.ConfigDict, path: str, value: Any
              ) -> None:
  *parents, leaf = path.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def _variant(name: str) -> models.VariantSpec:
  try:
    return models.get_variant(name)
  except ValueError as e:
    raise ConfigError(f'config.model.name: {e}') from None


def resolve(config: ml_collections.ConfigDict, data_num_classes: int,
            splits: Sequence[str] = ('train', 'validation')
            ) -> ml_collections.ConfigDict:
  """A copy of `config` with every placeholder filled, then validated.

  Fills, where None: the variant's train/eval image sizes, RandAugment level
  and dropout (`model.kwargs.drop_rate`); the family recipe's batch size,
  epochs, lr and its scaling, weight decay, AGC on/off, cosine end value,
  MixUp and CutMix (`nfnets.recipes`); `model.num_classes` (and with it
  `data.num_classes`) and the train / eval splits from the dataset. Values
  already set are kept.

  Args:
    config: an experiment config (e.g. configs/f0.py's).
    data_num_classes: the training dataset's class count.
    splits: the dataset's (train, eval) splits
      (`nfnets.data.default_splits(source)`).

  Returns:
    The resolved copy (locked if `config` was); `config` is not modified.

  Raises:
    ConfigError: an explicit `model.num_classes` that differs from the
      dataset's, or any check of `validate`.
  """
  out = copy.deepcopy(config)
  spec = _variant(out.model.name)
  out.model.name = spec.name
  for path, value in recipes.defaults_for(spec).items():
    if _get_path(out, path) is None:
      _set_path(out, path, value)
  for field, split in zip(('train_split', 'eval_split'), splits):
    if out.data[field] is None:
      out.data[field] = split
  data_num_classes = int(data_num_classes)
  if out.model.num_classes is None:
    out.model.num_classes = data_num_classes
  elif out.model.num_classes != data_num_classes:
    raise ConfigError(
        f'config.model.num_classes is {out.model.num_classes} but the dataset '
        f'{out.data.name!r} has {data_num_classes} classes; leave '
        'model.num_classes unset (None) to use the dataset\'s, or use a '
        f'dataset with {out.model.num_classes} classes.')
  validate(out)
  return out


def describe(resolved: ml_collections.ConfigDict) -> str:
  """One line stating what a resolved config trains (for the start-up log)."""
  c = resolved
  spec = models.get_variant(c.model.name)
  batch = c.train.batch_size
  peak = optim_lib.peak_learning_rate(c.optim, batch)
  lr = (f'lr {peak:g} ({c.optim.lr:g} x {batch}/256)'
        if c.optim.lr_scaling == 'linear' else f'lr {peak:g}')
  if c.optim.use_agc:
    lam = optim_lib.agc_clipping_value(c.optim.agc_clipping, batch)
    agc = f'AGC \u03bb {lam:g}' + (
        f' ({BY_BATCH})' if c.optim.agc_clipping == BY_BATCH else '')
  else:
    agc = 'no AGC'
  length = (f'{c.train.num_steps} steps' if c.train.num_steps
            else f'{c.train.num_epochs:g} epochs')
  drop = c.model.kwargs.drop_rate
  drop = spec.dropout if drop is None else drop
  return (f'{spec.name} ({spec.family}): train {c.data.image_size} px, eval '
          f'{c.data.eval_image_size} px, RandAugment '
          f'{c.data.randaug or "off"}, dropout {drop:g}, batch {batch}, {lr}, '
          f'wd {c.optim.weight_decay:g}, {agc}, {length}, '
          f'{c.model.num_classes} classes')


_FAMILY_CLASSES = {'nfnet': models.NFNet, 'nf_resnet': models.NFResNet,
                   'nf_regnet': models.NFRegNet, 'nfnet_l': models.NFNetL,
                   'nf_resnet_timm': models.TimmNFResNet}


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None
             ) -> None:
  """Checks values the type system cannot, with messages naming the field.

  Placeholders still None (before `resolve`) are skipped; every value that
  is set is checked.
  """
  def fail(field, msg):
    raise ConfigError(f'config.{field}: {msg}')
  spec = _variant(config.model.name)
  accepted = inspect.signature(_FAMILY_CLASSES[spec.family]).parameters
  for name, value in model_kwargs(config).items():
    if name not in accepted:
      fail(f'model.kwargs.{name}', f'{spec.family} models ({spec.name}) do '
           f'not take {name!r}; leave it None. They take: '
           f'{", ".join(k for k in accepted if k in MODEL_KWARGS)}.')
  lowering = config.model.kwargs.conv_lowering
  if lowering is not None and lowering not in CONV_LOWERINGS:
    fail('model.kwargs.conv_lowering', f"must be None (backend default), "
         f"'xla' or 'cpu', got {lowering!r}")
  for field in ('compute_dtype', 'eval_compute_dtype'):
    if config.model[field] not in COMPUTE_DTYPES:
      fail(f'model.{field}', f'must be one of {COMPUTE_DTYPES}, got '
           f'{config.model[field]!r}')
  if not isinstance(config.data.name, str) or not config.data.name:
    fail('data.name', 'must name a dataset: a TFDS builder name, \'folder\', '
         f"'digits' or 'fake'; got {config.data.name!r}")
  if config.data.num_classes != config.model.num_classes:
    fail('data.num_classes', f'{config.data.num_classes} != model.num_classes '
         f'{config.model.num_classes}')
  if config.model.num_classes is not None and config.model.num_classes < 1:
    fail('model.num_classes', f'must be positive, got '
         f'{config.model.num_classes}')
  for field in ('image_size', 'eval_image_size', 'shuffle_buffer'):
    value = config.data[field]
    if value is not None and value <= 0:
      fail(f'data.{field}', f'must be positive (or None), got {value}')
  if config.data.mixup_alpha is not None and config.data.mixup_alpha < 0:
    fail('data.mixup_alpha', f'must be >= 0, got {config.data.mixup_alpha}')
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps',
                'sync_every_steps', 'grad_accum_steps'):
    value = config.train[field]
    if value is not None and value <= 0:
      fail(f'train.{field}', f'must be positive, got {value}')
  if num_devices:
    for field in ('batch_size', 'eval_batch_size'):
      value = config.train[field]
      if value is not None and value % num_devices:
        fail(f'train.{field}', f'{value} is not divisible by the '
             f'{num_devices} devices; use a multiple of {num_devices}')
  k, batch = config.train.grad_accum_steps, config.train.batch_size
  if batch is not None and k > 1:
    per_device = batch // (num_devices or 1)
    if per_device % k:
      where = (f' (batch_size {batch} / {num_devices} devices)'
               if num_devices else '')
      fail('train.grad_accum_steps', f'the per-device batch {per_device}'
           f'{where} is not divisible into {k} micro-batches')
  if config.train.log_level not in LOG_LEVELS:
    fail('train.log_level', f'must be one of {LOG_LEVELS}, got '
         f'{config.train.log_level!r}')
  if config.parallel.backend not in BACKENDS:
    fail('parallel.backend', f'must be one of {BACKENDS}, got '
         f'{config.parallel.backend!r}')
  if config.parallel.fsdp and config.parallel.backend != 'jit':
    fail('parallel.fsdp', "needs parallel.backend='jit' (pmap replicates the "
         'params on every device)')
  if config.init.params not in ('ema', 'raw'):
    fail('init.params', f"must be 'ema' or 'raw', got {config.init.params!r}")
  epochs = config.train.num_epochs
  if config.train.num_steps is None and epochs is not None and not (
      math.isfinite(epochs) and epochs > 0):
    fail('train.num_epochs', f'must be positive (or set train.num_steps), got '
         f'{epochs}')
  optim = config.optim
  if optim.lr_scaling is not None and optim.lr_scaling not in LR_SCALINGS:
    fail('optim.lr_scaling', f'must be one of {LR_SCALINGS}, got '
         f'{optim.lr_scaling!r}')
  if optim.lr is not None and not optim.lr > 0:
    fail('optim.lr', f'must be positive, got {optim.lr}')
  try:
    optim_lib.agc_clipping_value(optim.agc_clipping,
                                    config.train.batch_size or 1)
  except ValueError as e:
    fail('optim.agc_clipping', str(e))
