"""Dataset sources: where examples come from and how one image is decoded.

A source knows its splits (`split_infos`), its class count (`num_classes`),
how to read an ordered range of records (`read(pieces)` -> tf.data of
{'record', 'label' int64, 'id' int64}) and how to turn one record into an
image (`decode_train` / `augment_train` / `decode_eval`). It knows nothing of
hosts, shuffling, batching, mixing or resumption: all of that lives in
nfnets/data/pipeline.py, which every source goes through unchanged.

Sources (config.data.name):
  * any tensorflow-datasets builder name ('imagenet2012', 'cifar10',
    'oxford_flowers102', 'imagenette/320px-v2', 'my_builder:1.0.0', ...):
    `TfdsSource`. The image is the builder's one `tfds.features.Image` and
    the label its `ClassLabel` named 'label' (or its only ClassLabel);
    config.data.image_key / label_key choose when there are several.
  * 'folder': an image folder, DIR/train/<class>/*, DIR/val/<class>/*
    (nfnets/data/folder.py).
  * 'digits': the embedded sklearn digits (nfnets/data/digits.py).
  * 'fake': random images generated in the pipeline (benchmarks, smoke tests).
  * `InMemorySource`: encoded images held in memory (benchmarks, tests).

Images: encoded JPEG, PNG (and anything tf.io.decode_image reads: GIF, BMP),
or images stored decoded (uint8 [H, W, C] tensors), grey or RGB(A); all
become RGB. Train: inception crop (area 0.08-1, aspect 3/4-4/3; for JPEG only
the crop window is decoded, `tf.io.decode_and_crop_jpeg`), random flip,
resize to image_size. Eval: the release's 'resize_crop_32' (resize to
(S + 32)^2, centre S^2 crop). These are the NFNet release's ImageNet
transforms (deepmind-research/nfnets/dataset.py, eval_preproc
'resize_crop_32'), used for every dataset.
"""
import difflib
import os
from typing import Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nfnets.data import digits as digits_lib
from nfnets.data import preprocess
from nfnets.data import splits as splits_lib
from nfnets.data.base import AUTOTUNE, Source, concat, no_autograph
from nfnets.data.folder import FolderSource
from nfnets.errors import DataError
_BIG = 2 ** 62
IMAGENET_TRAIN_EXAMPLES = 1_281_167
IMAGENET_EVAL_EXAMPLES = 50_000


class DatasetNotPreparedError(DataError, FileNotFoundError):
  """The requested tfds dataset is not prepared in the data dir."""


def _imagenet_not_prepared_message(name: str, data_dir: str) -> str:
  manual = os.path.join(data_dir, 'downloads', 'manual')
  return (
      f'{name} is not prepared in {data_dir}.\n'
      'To prepare it (once; needs ~300 GB of disk and a few hours):\n'
      '  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
      '(register at https://image-net.org/download-images) and place them in\n'
      f'       {manual}\n'
      '  2. Run\n'
      f'       python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"\n"
      f'     or: tfds build {name} --data_dir {data_dir} --manual_dir {manual}\n'
      'Set config.data.data_dir (or TFDS_DATA_DIR) to use another directory.\n'
      'To run without ImageNet, try the demo config (configs/demo.py), which '
      "trains on the embedded 'digits' dataset (no download).")


def _not_prepared_message(name: str, data_dir: str) -> str:
  base = name.split(':')[0].split('/')[0]
  return (
      f'tensorflow-datasets dataset {name!r} is not prepared in {data_dir}.\n'
      'Prepare it once (downloads and converts it) with\n'
      f'  tfds build {name} --data_dir {data_dir}\n'
      f'or: python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"\n"
      'Some datasets need files downloaded by hand first; the catalog page '
      f'https://www.tensorflow.org/datasets/catalog/{base} says which.\n'
      'Set config.data.data_dir (or TFDS_DATA_DIR) to use another directory, '
      "or config.data.name = 'folder' for a folder of images "
      '(DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg).')


# ---------------------------------------------------------------------------
# tensorflow-datasets builders.
def _tfds_read(builder, split: str, decoders) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(
      options=options, try_autocache=False, skip_prefetch=True,
      add_tfds_id=True, interleave_cycle_length=16, interleave_block_length=16)
  return builder.as_dataset(split=split, shuffle_files=False,
                            read_config=read_config, decoders=decoders)


def _image_candidates(features):
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  if images:
    return images, True
  decoded = [k for k, f in features.items()
             if isinstance(f, tfds.features.Tensor) and len(f.shape) == 3
             and f.np_dtype == np.uint8 and f.shape[-1] in (1, 3, 4)]
  return decoded, False


def find_features(features, name: str, image_key: Optional[str] = None,
                  label_key: Optional[str] = None):
  """(image_key, encoded, label_key) of a tfds FeaturesDict, or DataError."""
  all_keys = sorted(features.keys())
  images, encoded = _image_candidates(features)
  if image_key is not None:
    if image_key not in features:
      raise DataError(f'{name}: config.data.image_key={image_key!r} is not a '
                       f'feature; features: {all_keys}.')
    if image_key not in images:
      raise DataError(
          f'{name}: feature {image_key!r} is not an image '
          f'({features[image_key]!r}); image features: {images or "none"}.')
  elif len(images) == 1:
    image_key = images[0]
  elif not images:
    raise DataError(f'{name} has no image feature (tfds.features.Image or a '
                     f'uint8 [H, W, C] tensor); features: {all_keys}.')
  else:
    raise DataError(f'{name} has several image features {images}; set '
                     'config.data.image_key to one of them.')
  image_feature = features[image_key]
  if encoded and image_feature.np_dtype != np.uint8:
    raise DataError(f'{name}: image feature {image_key!r} has dtype '
                     f'{image_feature.np_dtype}; only uint8 images are supported.')

  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if label_key is not None:
    if label_key not in labels:
      raise DataError(f'{name}: config.data.label_key={label_key!r} is not a '
                       f'ClassLabel feature; ClassLabel features: {labels or "none"}.')
  elif 'label' in labels:
    label_key = 'label'
  elif len(labels) == 1:
    label_key = labels[0]
  elif not labels:
    raise DataError(f'{name} has no class label (tfds.features.ClassLabel); '
                     f'features: {all_keys}.')
  else:
    raise DataError(f'{name} has several ClassLabel features {labels} and none '
                     "is named 'label'; set config.data.label_key to one of them.")
  return image_key, encoded, label_key


class TfdsSource(Source):
  """Any prepared tfds builder with an image and a ClassLabel feature."""

  def __init__(self, builder, name: Optional[str] = None,
               image_key: Optional[str] = None, label_key: Optional[str] = None):
    self.builder = builder
    self.name = name or builder.info.full_name
    features = builder.info.features
    self.image_key, self.encoded, self.label_key = find_features(
        features, self.name, image_key, label_key)
    self.num_classes = features[self.label_key].num_classes
    self.split_infos = builder.info.splits
    # imagenet2012's builder converts its one PNG (and CMYK files) to RGB
    # JPEG; tfds does not check other builders' 'jpeg' features, so those
    # take the per-image format test.
    self.jpeg_only = self.encoded and self.name.startswith('imagenet2012')
    # Encoded images are decoded in the pipeline (crop-then-decode for JPEG).
    self._decoders = {k: tfds.decode.SkipDecoding() for k, f in features.items()
                      if isinstance(f, tfds.features.Image)} or None

  def _id(self, ex):
    return tf.strings.to_hash_bucket_fast(ex['tfds_id'], _BIG)

  def read(self, pieces):
    split = '+'.join(f'{n}[{a}:{b}]' for n, a, b in pieces)
    ds = _tfds_read(self.builder, split, self._decoders)

    @no_autograph
    def fmt(ex):
      return {'record': ex[self.image_key],
              'label': tf.cast(ex[self.label_key], tf.int64), 'id': self._id(ex)}
    return ds.map(fmt, num_parallel_calls=AUTOTUNE, deterministic=True)


class DigitsSource(TfdsSource):
  """The embedded digits (32x32 PNG): pad-2 random crop, no flip (digits are
  not mirror-invariant), resized if image_size != 32."""

  def __init__(self, builder):
    super().__init__(builder, name='digits')

  def _id(self, ex):
    return tf.cast(ex['id'], tf.int64)

  @staticmethod
  def _decode(record):
    image = tf.io.decode_png(record, channels=3)
    image.set_shape([digits_lib.IMAGE_SIZE, digits_lib.IMAGE_SIZE, 3])
    return image

  def decode_train(self, record, seed, image_size, cfg):
    return self._decode(record)

  def augment_train(self, decoded, seed, image_size, cfg):
    pad = int(cfg.digits_pad)
    image = preprocess.pad_and_random_crop(decoded, seed, pad) if pad else decoded
    if image_size != digits_lib.IMAGE_SIZE:
      image = preprocess.resize(image, image_size, cfg.resize_method)
    return preprocess.to_uint8(image)

  def decode_eval(self, record, image_size, cfg):
    image = tf.cast(self._decode(record), tf.float32)
    if image_size != digits_lib.IMAGE_SIZE:
      image = preprocess.resize(image, image_size, cfg.resize_method)
    return image


# ---------------------------------------------------------------------------
# In-memory and generated sources.
class InMemorySource(Source):
  """Encoded images (JPEG, PNG, ...) held in memory, with the same decoding
  as a tfds builder (benchmarks, tests). Split 'train' (also served as
  'validation'); example ids are the indices."""

  def __init__(self, images: Sequence[bytes], labels: Sequence[int],
               num_classes: int = 1000, name: str = 'in_memory'):
    self.name = name
    self.labels = np.asarray(labels, np.int64)
    n = len(images)
    if len(self.labels) != n:
      raise ValueError(f'{n} images but {len(self.labels)} labels.')
    self.split_infos = {'train': splits_lib.SplitLen(n),
                        'validation': splits_lib.SplitLen(n)}
    self.num_classes = num_classes
    self.jpeg_only = all(bytes(x[:3]) == b'\xff\xd8\xff' for x in images)
    self.cheap_read = True
    self._table = tf.constant(list(images))
    self._label_table = tf.constant(self.labels)

  def read(self, pieces):
    return concat([tf.data.Dataset.range(a, b).map(
        lambda i: {'record': tf.gather(self._table, i),
                   'label': tf.gather(self._label_table, i), 'id': i})
                   for _, a, b in pieces])


class FakeSource(Source):
  """Random uint8 images generated from the example index (no I/O).

  Splits 'train' (fake_train_examples, default ImageNet's 1,281,167) and
  'validation' / 'test' (fake_eval_examples, default 50,000)."""

  def __init__(self, num_classes: int, train_examples: Optional[int] = None,
               eval_examples: Optional[int] = None):
    self.name = 'fake'
    n_eval = int(eval_examples or IMAGENET_EVAL_EXAMPLES)
    sizes = {'train': int(train_examples or IMAGENET_TRAIN_EXAMPLES),
             'validation': n_eval, 'test': n_eval}
    self.split_infos = {k: splits_lib.SplitLen(v) for k, v in sizes.items()}
    self._salt = {k: i for i, k in enumerate(sorted(sizes))}
    self.num_classes = num_classes

  def read(self, pieces):
    dss = []
    for name, a, b in pieces:
      salt = self._salt[name]
      dss.append(tf.data.Dataset.range(a, b).map(
          lambda i, salt=salt: self._example(salt, i)))
    return concat(dss)

  def _example(self, salt, i):
    seed = tf.stack([tf.constant(salt, tf.int64), i])
    label = tf.random.stateless_uniform([], seed, 0, self.num_classes, dtype=tf.int64)
    return {'record': seed, 'label': label, 'id': i + salt * _BIG // 8}

  @staticmethod
  def _image(seed, image_size):
    return tf.random.stateless_uniform(
        [image_size, image_size, 3], seed, 0, 256, dtype=tf.int32)

  def decode_train(self, record, seed, image_size, cfg):
    return tf.cast(self._image(record, image_size), tf.uint8)

  def augment_train(self, decoded, seed, image_size, cfg):
    return tf.image.stateless_random_flip_left_right(decoded, seed)

  def decode_eval(self, record, image_size, cfg):
    return tf.cast(self._image(record, image_size), tf.float32)


# ---------------------------------------------------------------------------
# Selection.
def _tfds_builder(name: str, data_dir: Optional[str]):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    pass  # tfds' message lists its whole catalogue: ours names close ones.
  base = name.split(':')[0].split('/')[0]
  close = difflib.get_close_matches(
      base, tfds.list_builders(with_community_datasets=False) +
      ['folder', 'digits', 'fake'], n=3, cutoff=0.75)
  hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
  raise DataError(
      f'Unknown dataset {name!r} (config.data.name).{hint} Use a '
      "tensorflow-datasets builder name (e.g. 'imagenet2012', 'cifar10', "
      "'imagenette/320px-v2'; see https://www.tensorflow.org/datasets/catalog), "
      "'folder' (with config.data.data_dir), 'digits' or 'fake'.")


def get_source(data_config) -> Source:
  """The source for data_config.name; raises DatasetNotPreparedError."""
  name = data_config.name
  data_dir = data_config.data_dir
  if not name:
    raise DataError('config.data.name is empty: a tfds builder name, '
                    "'folder', 'digits' or 'fake'.")
  if name == 'digits':
    return DigitsSource(digits_lib.prepare(data_dir))
  if name == 'fake':
    return FakeSource(int(data_config.num_classes or 1000),
                      data_config.fake_train_examples,
                      data_config.fake_eval_examples)
  if name == 'folder':
    return FolderSource(data_dir)
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    root = os.fspath(builder.data_dir_root)
    if name.startswith('imagenet2012'):
      raise DatasetNotPreparedError(_imagenet_not_prepared_message(name, root))
    raise DatasetNotPreparedError(_not_prepared_message(name, root))
  return TfdsSource(builder, name=name, image_key=data_config.image_key,
                    label_key=data_config.label_key)


def default_splits(source: Source) -> Tuple[str, str]:
  """The (train, eval) splits a run uses when config.data leaves them None.

  Train: 'train'. Eval: 'validation', else 'test', else 'val' (an image
  folder's). A dataset with only a train split has no held-out data: the
  DataError says to slice one.
  """
  splits = set(source.split_infos or ())
  if 'train' not in splits:
    raise DataError(
        f'{source.name} has no \'train\' split (it has {sorted(splits)}): set '
        'config.data.train_split and config.data.eval_split.')
  for eval_split in getattr(source, 'eval_splits', ('validation', 'test',
                                                    'val')):
    if eval_split in splits:
      return 'train', eval_split
  raise DataError(
      f'{source.name} has only a train split: set '
      "config.data.train_split='train[:90%]' and "
      "config.data.eval_split='train[90%:]' (or other tfds slicing) to hold "
      'out part of it for evaluation.')


def check_split(source: Source, split: str, field: str) -> int:
  """The size of `split` of `source`; a DataError naming config.data.`field`
  and the available splits if the source has no such split, or it is empty."""
  try:
    n = splits_lib.pieces_len(
        splits_lib.resolve_split(source.split_infos, split, where=source.name))
  except DataError as e:
    raise DataError(f'config.data.{field}: {e}') from None
  if not n:
    raise DataError(f'config.data.{field}={split!r} of {source.name} holds no '
                    'examples.')
  return n


def num_examples(data_config, split: str, *, source: Optional[Source] = None) -> int:
  """Number of examples of `split` (tfds split syntax) of data_config's dataset."""
  source = source or get_source(data_config)
  return splits_lib.pieces_len(
      splits_lib.resolve_split(source.split_infos, split, where=source.name))


def num_classes(data_config, *, source: Optional[Source] = None) -> int:
  """The dataset's class count (for 'fake': data_config.num_classes or 1000)."""
  source = source or get_source(data_config)
  return int(source.num_classes)
