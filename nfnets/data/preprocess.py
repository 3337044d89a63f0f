"""Per-example image preprocessing (TensorFlow ops, run inside tf.data).

All randomness is stateless: every random function takes a `seed` tensor of
shape [2] (int32/int64) and gives the same result for the same seed, so a
pipeline that derives the seed from (run seed, example position) produces the
same augmentations after a restart.

Images are float32 on the 0..255 scale until `normalize`. As in the NFNet
release (deepmind-research nfnets/dataset.py `_preprocess_image`), the bicubic
resize is not clipped: values overshoot 0..255 near sharp edges (the release
notes e.g. [-51.1, 336.6]); eval images keep the overshoot. Train images are
stored as uint8 (`train_image_from_crop`), which clips; the release clips its
train images only where it converts them to uint8 for RandAugment.
"""
import re
from typing import Optional, Tuple, Union

import tensorflow as tf

# Normalisation as in the release (ImageNet mean / std, in 0..255 units).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Inception crop parameters (release).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3. / 4., 4. / 3.)
CROP_MAX_ATTEMPTS = 10
CROP_PADDING = 32  # centre-crop fallback and eval 'resize_crop_32'.

_RESIZE_METHODS = ('bicubic', 'bilinear', 'nearest', 'area', 'lanczos3',
                   'lanczos5', 'gaussian', 'mitchellcubic')


def split_seed(seed, num):
  """`num` independent [2]-shaped seeds from one [2]-shaped seed."""
  return tf.random.experimental.stateless_split(
      tf.cast(seed, tf.int64), num=num)


def resize(image, size: int, method: str = 'bicubic'):
  """Resizes `image` [H, W, C] (any dtype) to [size, size, C] float32.

  Not clipped, as in the release: bicubic / lanczos overshoot 0..255 near
  sharp edges. `to_uint8` clips where a uint8 image is needed."""
  if method not in _RESIZE_METHODS:
    raise ValueError(f'Unknown resize method {method!r}; one of {_RESIZE_METHODS}')
  return tf.image.resize(tf.cast(image, tf.float32), [size, size], method=method)


def _inception_crop_window(image_shape, seed, image_size: int):
  """Crop window [y, x, h, w] (int32) of an inception-style random crop.

  `tf.image.stateless_sample_distorted_bounding_box` with area 0.08-1, aspect
  3/4-4/3 and 10 attempts; when all attempts fail it returns the whole image,
  in which case (as in the release) we fall back to the centre crop used at
  evaluation: a square of side image_size / (image_size + 32) * min(h, w).
  """
  image_shape = tf.cast(image_shape, tf.int32)
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=bbox,
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=CROP_ASPECT_RANGE,
      area_range=CROP_AREA_RANGE,
      max_attempts=CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  offset_y, offset_x, _ = tf.unstack(begin)
  target_h, target_w, _ = tf.unstack(size)
  # Sampling failed <=> the sampled box is the full image.
  failed = tf.logical_and(tf.equal(target_h, image_shape[0]),
                          tf.equal(target_w, image_shape[1]))
  cy, cx, ch, cw = _center_crop_window(image_shape, image_size)
  return tf.stack([
      tf.where(failed, cy, offset_y),
      tf.where(failed, cx, offset_x),
      tf.where(failed, ch, target_h),
      tf.where(failed, cw, target_w),
  ])


def _center_crop_window(image_shape, image_size: int):
  h, w = image_shape[0], image_shape[1]
  # float32 min(h, w) / (size + 32) * size, truncated: the release's
  # `_decode_and_center_crop` arithmetic, operation for operation.
  scale = tf.cast(tf.minimum(h, w), tf.float32) / float(image_size + CROP_PADDING)
  crop = tf.cast(scale * float(image_size), tf.int32)
  crop = tf.maximum(crop, 1)
  return (h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop


def decode_and_inception_crop(jpeg_bytes, seed, image_size: int):
  """Random inception crop decoded straight from the JPEG (uint8 [h, w, 3]).

  Only the crop window is decoded (`tf.io.decode_and_crop_jpeg`). Raises
  InvalidArgumentError on an undecodable image; the pipeline skips those.
  """
  shape = tf.io.extract_jpeg_shape(jpeg_bytes)
  window = _inception_crop_window(shape, seed, image_size)
  return tf.io.decode_and_crop_jpeg(jpeg_bytes, window, channels=3)


def to_uint8(image):
  """Clips a float image to 0..255 and rounds it to uint8 (no-op for uint8).

  Rounding (not the release's truncating cast) because this is our storage
  step before mixing; the release's own conversion, right before
  RandAugment, is in `randaugment.randaugment_image`."""
  if image.dtype == tf.uint8:
    return image
  return tf.cast(tf.round(tf.clip_by_value(image, 0., 255.)), tf.uint8)


def train_image_from_crop(crop, seed, image_size: int,
                          resize_method: str = 'bicubic', flip: bool = True):
  """Resize a decoded crop to image_size^2, round to uint8 and randomly flip.

  Train images stay uint8 until the batch is normalised (4x less memory
  traffic than float; the rounding is at most half a grey level). The uint8
  conversion clips the bicubic overshoot, which the release keeps in train
  images when RandAugment is off (with RandAugment it clips too)."""
  image = to_uint8(resize(crop, image_size, resize_method))
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seed=seed)
  return image


def eval_image_resize_crop(image, image_size: int, resize_method: str = 'bicubic'):
  """Release eval ('resize_crop_32'): resize the whole image (aspect ratio not
  kept) to (size + 32)^2, then take the central size^2 crop. Float32, not
  clipped: bicubic values may lie outside 0..255, as in the release."""
  big = image_size + CROP_PADDING
  image = resize(image, big, resize_method)
  off = CROP_PADDING // 2
  return image[off:off + image_size, off:off + image_size, :]


def decode_eval_jpeg(jpeg_bytes, image_size: int, resize_method: str = 'bicubic'):
  image = tf.io.decode_jpeg(jpeg_bytes, channels=3)
  return eval_image_resize_crop(image, image_size, resize_method)


def pad_and_random_crop(image, seed, pad: int):
  """Zero-pad by `pad` pixels on each side, then a random crop of the
  original size (light augmentation for tiny images such as digits)."""
  shape = tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, size=shape, seed=seed)


def normalize(image, mean=MEAN_RGB, std=STDDEV_RGB):
  """(image - mean) / std per channel; image float in 0..255."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def normalized_range(mean=MEAN_RGB, std=STDDEV_RGB):
  """(min, max) a normalised image can take (0 and 255 inputs)."""
  lo = min((0. - m) / s for m, s in zip(mean, std))
  hi = max((255. - m) / s for m, s in zip(mean, std))
  return lo, hi


def one_hot_smoothed(label, num_classes: int, smoothing: float = 0.0):
  """One-hot float32 label with label smoothing (mass sums to 1)."""
  oh = tf.one_hot(tf.cast(label, tf.int32), num_classes, dtype=tf.float32)
  if smoothing:
    oh = oh * (1.0 - smoothing) + smoothing / num_classes
  return oh


_RANDAUG_OFF = ('', '0', 'none', 'false', 'off')


def parse_randaug(level: Optional[Union[str, int]]) -> Optional[Tuple[int, int]]:
  """RandAugment level -> (num_layers, magnitude), or None for off.

  The release's rule (nfnets/dataset.py `_augment_image`): an integer
  N = layers * 100 + magnitude, so '405' -> (4, 5), '215' -> (2, 15),
  '1015' -> (10, 15); an integer of at most 100 is a magnitude alone and gets
  2 layers (the RandAugment paper's default): '15' -> (2, 15).

  Args:
    level: the level as a string or int; None, '', '0', 'none', 'off',
      'false' (any case) turn RandAugment off.

  Returns:
    (num_layers, magnitude) or None.

  Raises:
    ValueError: for anything that is not a non-negative integer.
  """
  if level is None:
    return None
  if isinstance(level, bool) or not isinstance(level, (str, int)):
    raise ValueError(
        f'RandAugment level must be a string or int such as "405", got '
        f'{level!r} ({type(level).__name__})')
  text = str(level).strip().lower()
  if text in _RANDAUG_OFF:
    return None
  if not re.fullmatch(r'[0-9]+', text):
    raise ValueError(
        f'RandAugment level must be a non-negative integer layers*100 + '
        f'magnitude, e.g. "405" (4 layers, magnitude 5) or "1015" (10 layers, '
        f'magnitude 15); "" or "0" turns it off. Got {level!r}.')
  value = int(text)
  if value == 0:
    return None
  if value > 100:
    return value // 100, value % 100
  return 2, value
