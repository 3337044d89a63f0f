"""Input pipelines for NFNets: tfds ImageNet, the embedded digits, fake data.

Public API (see nfnets/data/pipeline.py for the guarantees):
  create_train_iterator(data_config, *, global_batch_size, seed, start_step=0)
  create_eval_iterator(data_config, *, global_batch_size)
  num_examples(data_config, split)
  DatasetNotPreparedError
"""
from nfnets.data import digits
from nfnets.data import mix
from nfnets.data import preprocess
from nfnets.data import randaugment
from nfnets.data.mix import cutmix, mixup, mixup_cutmix
from nfnets.data.pipeline import (
    DatasetNotPreparedError,
    FakeSource,
    InMemoryJpegSource,
    build_train_dataset,
    create_eval_iterator,
    create_train_iterator,
    get_source,
    num_examples,
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

__all__ = [
    'DatasetNotPreparedError', 'FakeSource', 'InMemoryJpegSource', 'MEAN_RGB',
    'STDDEV_RGB', 'build_train_dataset', 'create_eval_iterator',
    'create_train_iterator', 'cutmix', 'decode_and_inception_crop',
    'decode_eval_jpeg', 'digits', 'eval_image_resize_crop', 'get_source', 'mix',
    'mixup', 'mixup_cutmix', 'normalize', 'num_examples', 'one_hot_smoothed',
    'parse_randaug', 'preprocess', 'rand_augment',
    'randaugment', 'train_image_from_crop',
]
