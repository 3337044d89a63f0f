"""What every source shares: the `Source` interface and image decoding.

A source knows its splits (`split_infos`), its class count (`num_classes`),
how to read an ordered range of records (`read(pieces)` -> tf.data of
{'record', 'label' int64, 'id' int64}) and how to turn one record into an
image (`decode_train` / `augment_train` / `decode_eval`); the sources are in
nfnets/data/sources.py and nfnets/data/folder.py.
"""
from typing import Optional, Sequence

import tensorflow as tf

from nfnets.data import preprocess
from nfnets.data import splits as splits_lib

AUTOTUNE = tf.data.AUTOTUNE

# Our map functions are plain TF code; autograph conversion only costs time.
no_autograph = tf.autograph.experimental.do_not_convert


# ---------------------------------------------------------------------------
# Image decoding shared by the image sources.
def to_rgb(image):
  """uint8 [h, w, 1|3|4] -> [h, w, 3] (grey repeated, alpha dropped)."""
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  if channels != 3:
    raise ValueError(f'Images must have 1, 3 or 4 channels, got shape {image.shape}.')
  return image


def decode_any(encoded):
  """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 [h, w, 3]."""
  image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def inception_crop(image, seed, image_size: int):
  """The train crop (same window as for JPEG) of a decoded uint8 image."""
  # pylint: disable=protected-access
  window = preprocess._inception_crop_window(tf.shape(image), seed, image_size)
  y, x, h, w = tf.unstack(window)
  return tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, -1]))


def decode_and_crop(encoded, seed, image_size: int, jpeg_only: bool = False):
  """Inception crop of encoded bytes: JPEG decodes only the crop window
  (fast path), other formats are decoded whole and then cropped. With
  jpeg_only (a source whose images are all JPEG) the format test is skipped."""
  if jpeg_only:
    return preprocess.decode_and_inception_crop(encoded, seed, image_size)
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: preprocess.decode_and_inception_crop(encoded, seed, image_size),
      lambda: inception_crop(decode_any(encoded), seed, image_size))


class Source:
  """Base: an image dataset with the ImageNet train / eval transforms.

  Subclasses set name, num_classes, split_infos, `encoded` (records are
  encoded bytes, else uint8 [h, w, C] tensors), `jpeg_only` (every record is
  a JPEG: no per-image format test) and implement read().
  """
  name: str = ''
  num_classes: Optional[int] = None
  split_infos = None
  encoded: bool = True
  jpeg_only: bool = False
  cheap_read: bool = False  # records can be re-read cheaply (to name skips)

  def read(self, pieces: Sequence[splits_lib.Piece]) -> tf.data.Dataset:
    """Records of `pieces`, in order: {'record', 'label' int64, 'id' int64}."""
    raise NotImplementedError

  def describe(self, split: str, index: int) -> str:
    """Human-readable name of example `index` of `split` (for messages)."""
    return f'{self.name} {split}[{index}]'

  def describe_record(self, record, example_id: int) -> str:
    """Human-readable name of a record read by read() (for messages)."""
    del record
    return f'{self.name} example id {example_id}'

  def load(self, record):
    """Record -> encoded bytes or decoded image (a folder reads the file)."""
    return record

  # Stage 1 (may fail on corrupt data; the pipeline skips such examples).
  def decode_train(self, record, seed, image_size: int, cfg):
    del cfg
    record = self.load(record)
    if self.encoded:
      return decode_and_crop(record, seed, image_size, self.jpeg_only)
    return inception_crop(to_rgb(record), seed, image_size)

  # Stage 2 (errors here are bugs, never swallowed): -> uint8 [S, S, 3].
  def augment_train(self, decoded, seed, image_size: int, cfg):
    return preprocess.train_image_from_crop(
        decoded, seed, image_size, cfg.resize_method)

  def decode_eval(self, record, image_size: int, cfg):
    record = self.load(record)
    image = decode_any(record) if self.encoded else to_rgb(record)
    return preprocess.eval_image_resize_crop(image, image_size, cfg.resize_method)


def concat(dss):
  if not dss:
    raise ValueError('Empty split.')
  ds = dss[0]
  for d in dss[1:]:
    ds = ds.concatenate(d)
  return ds
