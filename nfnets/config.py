"""The base experiment config and its validation.

Every experiment in configs/ is a `get_config()` built from `base_config()`
(all knobs listed and commented here, defaults = the paper's ImageNet
recipe for NFNet-F0) and then locked, so that a misspelt override fails.
"""
from typing import Optional

import ml_collections
from ml_collections import config_dict

from nfnets import models
from nfnets.optim import default_optim_config


def base_config(variant: str = 'F0') -> ml_collections.ConfigDict:
  """The paper's ImageNet training recipe for an F-variant (PAPER.md)."""
  spec = models.get_variant(variant)
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of every random stream (init, dropout, data order)

  c.model = ml_collections.ConfigDict()
  c.model.name = spec.name  # any of nfnets.models.variants()
  c.model.num_classes = 1000  # must match the dataset's classes
  # Keyword overrides of the model constructor (width, depth, group_size,
  # drop_rate, activation, group_conv_impl, ...); see nfnets.models.build.
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.kwargs.stochdepth_rate = 0.25  # released NFNet training value
  # Compute dtype of forward/backward: 'bfloat16' on accelerators (params
  # and optimizer state stay float32), 'float32' on CPU. 'auto' = bf16
  # unless the backend is CPU.
  c.model.compute_dtype = 'auto'

  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagenet2012'  # 'imagenet2012' | 'digits' | 'fake'
  c.data.data_dir = config_dict.placeholder(str)  # None: TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.train_split = 'train'  # 'train[10000:]' for the held-out protocol
  c.data.eval_split = 'validation'  # 'train[:10000]' for held-out validation
  c.data.image_size = spec.train_size  # training resolution (px)
  c.data.eval_image_size = spec.test_size  # evaluation resolution (px)
  c.data.num_classes = c.model.get_ref('num_classes')
  c.data.randaug = spec.randaug or ''  # '405' = 4 layers, magnitude 5; '' off
  c.data.mixup_alpha = 0.2  # MixUp lambda ~ Beta(a, a); 0 disables MixUp
  c.data.cutmix = True  # half of each batch MixUp, half CutMix
  c.data.label_smoothing = 0.1
  c.data.resize_method = 'bicubic'
  c.data.shuffle_buffer = 10_000
  c.data.cache = False  # cache decoded eval data in memory
  c.data.dtype = 'float32'  # host image dtype ('bfloat16' halves transfer)

  c.optim = default_optim_config()

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 4096  # global batch (all devices of all hosts)
  c.train.num_epochs = 360.0
  c.train.num_steps = config_dict.placeholder(int)  # overrides num_epochs
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

  c.parallel = ml_collections.ConfigDict()
  # How the steps use the devices (nfnets.training.parallel): 'pmap' (one
  # replica per local device) or 'jit' (jit + shard_map over all devices).
  c.parallel.backend = 'pmap'
  c.parallel.fsdp = False  # 'jit' only: shard params/optimizer state/EMA

  c.init = ml_collections.ConfigDict()
  # Start from weights: a released F*_haiku.npz, a safe .npz, or one of our
  # workdirs/checkpoint dirs. None: random initialisation.
  c.init.checkpoint = config_dict.placeholder(str)
  c.init.params = 'ema'  # which params of our own checkpoints: 'ema' | 'raw'
  c.init.reset_classifier = False  # re-initialise the classifier (new task)

  c.distributed = ml_collections.ConfigDict()
  # Multi-host: call jax.distributed.initialize(). 'auto': only when the
  # coordinator is given (here or in env) or on TPU pods/SLURM.
  c.distributed.initialize = 'auto'
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  return c


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None
             ) -> None:
  """Checks values the type system cannot, with messages naming the field."""
  def fail(field, msg):
    raise ValueError(f'config.{field}: {msg}')
  try:
    models.get_variant(config.model.name)
  except ValueError as e:
    fail('model.name', str(e))
  if config.model.compute_dtype not in ('auto', 'float32', 'bfloat16'):
    fail('model.compute_dtype', f"must be 'auto', 'float32' or 'bfloat16', "
         f'got {config.model.compute_dtype!r}')
  if config.data.name not in ('imagenet2012', 'digits', 'fake'):
    fail('data.name', f"must be 'imagenet2012', 'digits' or 'fake', got "
         f'{config.data.name!r}')
  if config.data.num_classes != config.model.num_classes:
    fail('data.num_classes', f'{config.data.num_classes} != model.num_classes '
         f'{config.model.num_classes}')
  for field in ('batch_size', 'eval_batch_size', 'log_every_steps',
                'sync_every_steps'):
    if config.train[field] <= 0:
      fail(f'train.{field}', f'must be positive, got {config.train[field]}')
  if num_devices:
    for field in ('batch_size', 'eval_batch_size'):
      if config.train[field] % num_devices:
        fail(f'train.{field}', f'{config.train[field]} is not divisible by the '
             f'{num_devices} devices; use a multiple of {num_devices}')
  if config.init.params not in ('ema', 'raw'):
    fail('init.params', f"must be 'ema' or 'raw', got {config.init.params!r}")
  if config.train.num_steps is None and config.train.num_epochs <= 0:
    fail('train.num_epochs', 'must be positive (or set train.num_steps)')
