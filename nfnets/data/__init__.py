"""Input pipelines for NFNets: any tfds builder, an image folder, the
embedded digits, fake data.

Module layout:
  base.py     - the Source interface and the image decoding sources share.
  sources.py  - where examples come from: tfds builders incl. imagenet2012,
                in-memory, fake, digits; get_source(), default_splits().
  folder.py   - the image-folder source (DIR/train/<class>/*, DIR/val/...).
  splits.py   - tfds split strings -> pieces, per-host ranges.
  pipeline.py - the tf.data assembly of train / eval host batches that every
                source goes through (sharding, shuffling, mixing, resume).
  train_stages.py - the train pipeline's stages (order, decode, batches).
  mix.py, preprocess.py, randaugment.py - augmentation ops (TF, host).
  device_augment.py - MixUp/CutMix, RandAugment, normalisation in JAX
                (config.data.augment_on='device', the default).

Public API (see nfnets/data/pipeline.py for the guarantees):
  create_train_iterator(data_config, *, global_batch_size, seed, start_step=0)
  create_eval_iterator(data_config, *, global_batch_size)
  get_source(data_config), default_splits(source),
  check_split(source, split, field), num_examples(data_config, split),
  num_classes(data_config)
  DatasetNotPreparedError (a nfnets.errors.DataError, like every bad
  dataset / folder / split)
Batches are plain host batches [global_batch_size // process_count, ...];
device placement belongs to nfnets.training.
"""
from nfnets.data import digits
from nfnets.data import mix
from nfnets.data import preprocess
from nfnets.data import randaugment
from nfnets.data.folder import FolderSource
from nfnets.data.mix import cutmix, mixup, mixup_cutmix
from nfnets.data.pipeline import (
    EvalIterator,
    TrainIterator,
    build_train_dataset,
    create_eval_iterator,
    create_train_iterator,
)
from nfnets.data.preprocess import (
    MEAN_RGB,
    STDDEV_RGB,
    decode_and_inception_crop,
    decode_eval_jpeg,
    eval_image_resize_crop,
    normalize,
    one_hot_smoothed,
    parse_randaug,
    train_image_from_crop,
)
from nfnets.data.randaugment import randaugment as rand_augment
from nfnets.data.sources import (
    DatasetNotPreparedError,
    FakeSource,
    InMemorySource,
    TfdsSource,
    check_split,
    default_splits,
    get_source,
    num_classes,
    num_examples,
)

__all__ = [
    'DatasetNotPreparedError', 'EvalIterator', 'FakeSource', 'FolderSource',
    'InMemorySource', 'MEAN_RGB', 'STDDEV_RGB',
    'TfdsSource', 'TrainIterator', 'build_train_dataset', 'create_eval_iterator',
    'create_train_iterator', 'check_split', 'cutmix', 'decode_and_inception_crop',
    'decode_eval_jpeg', 'default_splits', 'digits', 'eval_image_resize_crop', 'get_source', 'mix',
    'mixup', 'mixup_cutmix', 'normalize', 'num_classes', 'num_examples',
    'one_hot_smoothed', 'parse_randaug', 'preprocess', 'rand_augment',
    'randaugment', 'train_image_from_crop',
]
