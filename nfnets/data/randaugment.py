"""RandAugment (Cubuk et al. 2019) written in TensorFlow, stateless.

16 ops, as in the TF-TPU `autoaugment.py` the NFNet release used:
AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, Color, Contrast,
Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Cutout,
SolarizeAdd. Each of `num_layers` layers picks one op uniformly at random and
always applies it (PAPER.md: "the chosen op always applied") at the fixed
magnitude (0..10). A level string '405' means 4 layers, magnitude 5.

Magnitude -> op argument (`mode`):
  * 'release' (default): the TF-TPU mapping, quirks included: enhance ops
    (Color/Contrast/Brightness/Sharpness) use factor = m/10*1.8 + 0.1 (identity
    at m=5), Posterize keeps int(m/10*4) bits, Solarize threshold = int(m/10*256).
  * 'increasing': every parametric op is the identity at m=0 and gets stronger
    with m: factor = 1 +- 0.9*m/10, bits = 8 - int(m/10*4),
    threshold = 256 - int(m/10*256).
Rotate (30 deg), Shear (0.3), Translate and Cutout use the same mapping in both
modes (identity at m=0, random sign where signed). Translate (100 px) and
Cutout (40 px) are defined for 224 px images in the release; here they scale
with the image size (x size/224) so tiny images (digits) stay sensible.
Differences from the TF-TPU code, on purpose: Contrast blends with the real
mean grey level (TF-TPU divides the pixel count by 256, a known bug); Posterize
with 0 bits is explicitly black; the fill value of geometric ops and Cutout is
128 as in the release.

All randomness is stateless (seed: [2] int tensor). Input and output are
uint8 [H, W, 3].
"""
import math

import tensorflow as tf

MAX_LEVEL = 10.
FILL_VALUE = 128
_REF_SIZE = 224.
_TRANSLATE_CONST = 100.
_CUTOUT_CONST = 40.

OP_NAMES = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
    'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
MODES = ('release', 'increasing')


# ---------------------------------------------------------------------------
# Helpers.
def _to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0., 255.), tf.uint8)


def blend(image1, image2, factor):
  """image1 + factor * (image2 - image1), clipped; factor 1 returns image2."""
  f1 = tf.cast(image1, tf.float32)
  f2 = tf.cast(image2, tf.float32)
  return _to_uint8(f1 + tf.cast(factor, tf.float32) * (f2 - f1))


def _grayscale(image):
  """uint8 [H, W, 1] luma (ITU-R 601-2, as tf.image.rgb_to_grayscale)."""
  f = tf.cast(image, tf.float32)
  gray = f[..., 0:1] * 0.2989 + f[..., 1:2] * 0.5870 + f[..., 2:3] * 0.1140
  return _to_uint8(gray)


def _transform(image, transform):
  """Projective transform (output -> input coords), nearest, fill 128."""
  shape = tf.shape(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
      output_shape=shape[:2],
      fill_value=tf.constant(FILL_VALUE, tf.float32),
      interpolation='NEAREST',
      fill_mode='CONSTANT')[0]
  out.set_shape(image.shape)
  return out


def _random_sign(value, seed):
  flip = tf.random.stateless_uniform([], seed=seed) < 0.5
  value = tf.cast(value, tf.float32)
  return tf.where(flip, -value, value)


def _size_scale(image):
  shape = tf.shape(image)
  return tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) / _REF_SIZE


# ---------------------------------------------------------------------------
# The ops. All take uint8 [H, W, 3] and return uint8 of the same shape.
def autocontrast(image):
  def scale_channel(ch):
    f = tf.cast(ch, tf.float32)
    lo = tf.reduce_min(f)
    hi = tf.reduce_max(f)
    scaled = (f - lo) * (255. / tf.maximum(hi - lo, 1.))
    return tf.where(hi > lo, scaled, f)
  chans = [scale_channel(image[..., c]) for c in range(3)]
  return _to_uint8(tf.stack(chans, -1))


def equalize(image):
  """Per-channel histogram equalisation (the PIL ImageOps.equalize rule)."""
  def scale_channel(ch):
    ch = tf.cast(ch, tf.int32)
    hist = tf.math.bincount(tf.reshape(ch, [-1]), minlength=256, maxlength=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(hist) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step > 0, tf.gather(lut, ch), ch)
  chans = [scale_channel(image[..., c]) for c in range(3)]
  return tf.cast(tf.stack(chans, -1), tf.uint8)


def invert(image):
  return 255 - image


def rotate(image, degrees):
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  rad = tf.cast(degrees, tf.float32) * (math.pi / 180.)
  cos, sin = tf.cos(rad), tf.sin(rad)
  x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.
  y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.
  return _transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0., 0.]))


def posterize(image, bits):
  bits = tf.cast(bits, tf.int32)
  shift = 8 - tf.clip_by_value(bits, 0, 8)
  q = tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift)
  return tf.cast(tf.where(bits <= 0, tf.zeros_like(q), q), tf.uint8)


def solarize(image, threshold):
  i = tf.cast(image, tf.int32)
  return tf.cast(tf.where(i < tf.cast(threshold, tf.int32), i, 255 - i), tf.uint8)


def solarize_add(image, addition, threshold=128):
  i = tf.cast(image, tf.int32)
  added = tf.clip_by_value(i + tf.cast(addition, tf.int32), 0, 255)
  return tf.cast(tf.where(i < threshold, added, i), tf.uint8)


def color(image, factor):
  degenerate = tf.tile(_grayscale(image), [1, 1, 3])
  return blend(degenerate, image, factor)


def contrast(image, factor):
  mean = tf.reduce_mean(tf.cast(_grayscale(image), tf.float32))
  degenerate = tf.fill(tf.shape(image), mean)
  return blend(degenerate, image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with a smoothed image (3x3 kernel, border pixels unchanged)."""
  f = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(f, kernel, [1, 1, 1, 1], padding='VALID')[0]
  smooth = tf.round(tf.clip_by_value(smooth, 0., 255.))
  mask = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = mask * smooth + (1. - mask) * f[0]
  return blend(degenerate, image, factor)


def shear_x(image, level):
  return _transform(image, tf.stack([1., level, 0., 0., 1., 0., 0., 0.]))


def shear_y(image, level):
  return _transform(image, tf.stack([1., 0., 0., level, 1., 0., 0., 0.]))


def translate_x(image, pixels):
  return _transform(image, tf.stack([1., 0., -pixels, 0., 1., 0., 0., 0.]))


def translate_y(image, pixels):
  return _transform(image, tf.stack([1., 0., 0., 0., 1., -pixels, 0., 0.]))


def cutout(image, pad_size, seed):
  """Fill a (2*pad_size)^2 square centred at a random pixel with 128."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cy = tf.random.stateless_uniform([], s1, 0, h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s2, 0, w, dtype=tf.int32)
  pad_size = tf.cast(pad_size, tf.int32)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inside = ((rows >= cy - pad_size) & (rows < cy + pad_size) &
            (cols >= cx - pad_size) & (cols < cx + pad_size))
  return tf.where(inside[..., None], tf.constant(FILL_VALUE, tf.uint8), image)


# ---------------------------------------------------------------------------
# Magnitude -> argument, and application.
def apply_op(image, name: str, magnitude, seed, mode: str = 'release'):
  """Applies op `name` at `magnitude` (0..10) to uint8 `image`."""
  if mode not in MODES:
    raise ValueError(f'Unknown RandAugment mode {mode!r}; one of {MODES}')
  m = tf.cast(magnitude, tf.float32) / MAX_LEVEL
  seed = tf.cast(seed, tf.int64)
  sign_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  release = mode == 'release'

  def enhance_factor():
    if release:
      return m * 1.8 + 0.1
    return 1. + _random_sign(m * 0.9, sign_seed)

  if name == 'AutoContrast':
    out = autocontrast(image)
  elif name == 'Equalize':
    out = equalize(image)
  elif name == 'Invert':
    out = invert(image)
  elif name == 'Rotate':
    out = rotate(image, _random_sign(m * 30., sign_seed))
  elif name == 'Posterize':
    bits = tf.cast(m * 4., tf.int32)
    out = posterize(image, bits if release else 8 - bits)
  elif name == 'Solarize':
    thr = tf.cast(m * 256., tf.int32)
    out = solarize(image, thr if release else 256 - thr)
  elif name == 'SolarizeAdd':
    out = solarize_add(image, tf.cast(m * 110., tf.int32))
  elif name == 'Color':
    out = color(image, enhance_factor())
  elif name == 'Contrast':
    out = contrast(image, enhance_factor())
  elif name == 'Brightness':
    out = brightness(image, enhance_factor())
  elif name == 'Sharpness':
    out = sharpness(image, enhance_factor())
  elif name == 'ShearX':
    out = shear_x(image, _random_sign(m * 0.3, sign_seed))
  elif name == 'ShearY':
    out = shear_y(image, _random_sign(m * 0.3, sign_seed))
  elif name == 'TranslateX':
    px = m * _TRANSLATE_CONST * _size_scale(image)
    out = translate_x(image, _random_sign(px, sign_seed))
  elif name == 'TranslateY':
    px = m * _TRANSLATE_CONST * _size_scale(image)
    out = translate_y(image, _random_sign(px, sign_seed))
  elif name == 'Cutout':
    pad = tf.cast(m * _CUTOUT_CONST * _size_scale(image), tf.int32)
    out = cutout(image, pad, op_seed)
  else:
    raise ValueError(f'Unknown RandAugment op {name!r}')
  out = tf.ensure_shape(out, image.shape)
  return out


def randaugment(image, seed, num_layers: int, magnitude, mode: str = 'release'):
  """`num_layers` uniformly chosen ops, each always applied, on uint8 image."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'randaugment expects uint8 images, got {image.dtype}')
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num_layers)
  shape = image.shape

  def layer(i, image):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.gather(seeds, i), 2))
    op_index = tf.random.stateless_uniform(
        [], choice_seed, 0, len(OP_NAMES), dtype=tf.int32)
    branches = [
        (lambda name=name: apply_op(image, name, magnitude, op_seed, mode))
        for name in OP_NAMES]
    return i + 1, tf.ensure_shape(tf.switch_case(op_index, branches), shape)

  # A while loop (not a Python loop) so the 16 branches are built once.
  _, image = tf.while_loop(lambda i, _: i < num_layers, layer,
                           (tf.constant(0), image))
  return tf.ensure_shape(image, shape)
