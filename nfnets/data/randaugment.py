"""RandAugment (Cubuk et al. 2019, arXiv 1909.13719) in TensorFlow, stateless.

Reference: the NFNet release (github.com/deepmind/deepmind-research,
nfnets/autoaugment.py `distort_image_with_randaugment`, a copy of the TF-TPU
AutoAugment/RandAugment code, called from nfnets/dataset.py `_augment_image`).
The facts below are that code's behaviour; the implementation is our own.

16 ops, in the release's order: AutoContrast, Equalize, Invert, Rotate,
Posterize, Solarize, Color, Contrast, Brightness, Sharpness, ShearX, ShearY,
TranslateX, TranslateY, Cutout, SolarizeAdd. Each of `num_layers` layers picks
one op uniformly at random and always applies it (the release draws a
probability per op but never uses it) at the fixed magnitude, MAX_LEVEL = 10
being the nominal maximum (NFNets use 5..15). A level string '405' means
4 layers, magnitude 5 (see `nfnets.data.preprocess.parse_randaug`).

Magnitude m -> op argument, with l = m / 10 (Python float arithmetic, i.e.
float64, then float32 / int as the release does):
  Rotate l*30 degrees, ShearX/Y l*0.3, TranslateX/Y l*100 px (all with a
  random sign); Cutout half-size int(l*40) px (a 2*half-size square box);
  SolarizeAdd int(l*110) added below 128. Translate and Cutout are absolute
  pixel counts (translate_const 100, cutout_const 40), whatever the image size:
  at 384 px and m=15 the shift is 150 px, the box 120 px; on small images
  (e.g. 32 px digits) the same magnitudes wipe most of the image.
`mode` chooses the mapping of the remaining parametric ops:
  * 'release' (default): the release exactly, quirks included: enhance ops
    (Color/Contrast/Brightness/Sharpness) use factor l*1.8 + 0.1 (identity at
    m=5); Posterize keeps bits = int(l*4) (the shift 8-bits is a uint8 and TF
    clamps shifts to 7, so 0 bits keeps the top bit); Solarize threshold
    int(l*256) is converted to uint8, i.e. taken mod 256 (m=10 inverts every
    pixel, m=15 solarizes at 128); Contrast blends with a constant grey of
    min(H*W/256, 255) -- the release sums the grey histogram (the pixel count)
    and divides by 256 instead of taking the mean grey level.
  * 'increasing': every op is the identity at m=0 and grows with m, as the
    RandAugment paper describes: factor 1 +- 0.9*l, bits 8 - int(l*4) (0 bits
    is black), threshold 256 - int(l*256) (no wrap-around), and Contrast
    blends with the image's rounded mean grey (PIL ImageEnhance.Contrast).
    Kept because the release's mapping is not monotonic in m, which makes
    magnitude sweeps on other datasets hard to read.
Geometric ops use nearest-neighbour sampling and, like Cutout, fill with grey
128 (the release's `replace` value). All float -> uint8 conversions truncate
after clipping to 0..255 (TF's cast), as in the release.

All randomness is stateless (seed: [2] int tensor). Ops take and return uint8
[H, W, 3]; `randaugment_image` also takes float images as the release does.
"""
import math

import tensorflow as tf

MAX_LEVEL = 10.
FILL_VALUE = 128
TRANSLATE_CONST = 100.  # px at l = m/10 = 1 (release translate_const).
CUTOUT_CONST = 40.      # half-size px at l = 1 (release cutout_const).

OP_NAMES = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
    'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
MODES = ('release', 'increasing')


# ---------------------------------------------------------------------------
# Helpers.
def _trunc_uint8(x):
  """float -> uint8 as the release does it: clip to 0..255, cast (truncate)."""
  return tf.cast(tf.clip_by_value(x, 0., 255.), tf.uint8)


def blend(image1, image2, factor):
  """image1 + factor * (image2 - image1) in float32, clipped and truncated.

  factor 0 returns image1, factor 1 returns image2; above 1 extrapolates.
  """
  f1 = tf.cast(image1, tf.float32)
  f2 = tf.cast(image2, tf.float32)
  return _trunc_uint8(f1 + tf.cast(factor, tf.float32) * (f2 - f1))


def _grayscale(image):
  """uint8 [H, W, 1] luma, exactly `tf.image.rgb_to_grayscale` (as released)."""
  return tf.image.rgb_to_grayscale(image)


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


# ---------------------------------------------------------------------------
# The ops. All take uint8 [H, W, 3] and return uint8 of the same shape.
def autocontrast(image):
  """Per channel, stretch [min, max] to [0, 255] (x*scale - min*scale)."""
  def scale_channel(ch):
    f = tf.cast(ch, tf.float32)
    lo = tf.reduce_min(f)
    hi = tf.reduce_max(f)
    scale = 255. / tf.maximum(hi - lo, 1.)  # hi - lo >= 1 whenever used.
    scaled = _trunc_uint8(f * scale + (-lo * scale))
    return tf.where(hi > lo, scaled, ch)
  return tf.stack([scale_channel(image[..., c]) for c in range(3)], -1)


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
  """Rotation about the centre (counter-clockwise for degrees > 0)."""
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  rad = tf.cast(degrees, tf.float32) * (math.pi / 180.)
  cos, sin = tf.cos(rad), tf.sin(rad)
  x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.
  y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.
  return _transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0., 0.]))


def posterize(image, bits, release: bool = True):
  """Keep the top `bits` bits of each value.

  Args:
    image: uint8 [H, W, 3].
    bits: int scalar.
    release: the release's TF semantics: the shift 8 - bits is converted to
      uint8 (mod 256) and TF's shift ops clamp it to 7, so bits <= 0 or > 8
      keep the top bit. False: PIL semantics (bits <= 0 is black, > 8 is
      the identity).
  """
  bits = tf.cast(bits, tf.int32)
  if release:
    shift = tf.minimum(tf.math.floormod(8 - bits, 256), 7)
  else:
    shift = 8 - tf.clip_by_value(bits, 0, 8)
  q = tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift)
  return tf.cast(q, tf.uint8)  # shift 8 (PIL, bits 0) gives 0: black.


def solarize(image, threshold, release: bool = True):
  """Invert the pixels >= threshold.

  Args:
    image: uint8 [H, W, 3].
    threshold: int scalar.
    release: compare with threshold mod 256, as the release does (its
      Python-int threshold is converted to the image's uint8 dtype, so 256
      becomes 0: every pixel inverted). False: plain integer comparison.
  """
  i = tf.cast(image, tf.int32)
  threshold = tf.cast(threshold, tf.int32)
  if release:
    threshold = tf.math.floormod(threshold, 256)
  return tf.cast(tf.where(i < threshold, i, 255 - i), tf.uint8)


def solarize_add(image, addition, threshold=128):
  i = tf.cast(image, tf.int32)
  added = tf.clip_by_value(i + tf.cast(addition, tf.int32), 0, 255)
  return tf.cast(tf.where(i < threshold, added, i), tf.uint8)


def color(image, factor):
  degenerate = tf.image.grayscale_to_rgb(_grayscale(image))
  return blend(degenerate, image, factor)


def contrast(image, factor, release: bool = True):
  """Blend with a constant grey image.

  Args:
    image: uint8 [H, W, 3].
    factor: blend factor (0 = the grey image, 1 = the image).
    release: the release's grey level: sum of the 256-bin grey histogram
      (= the pixel count H*W) / 256, clipped to 255 and truncated -- it does
      not depend on the pixel values. False: the rounded mean grey level (PIL
      ImageEnhance.Contrast).
  """
  gray = _grayscale(image)
  if release:
    hist = tf.histogram_fixed_width(tf.cast(gray, tf.int32), [0, 255], nbins=256)
    level = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.
    level = _trunc_uint8(level)
  else:
    level = _trunc_uint8(tf.floor(tf.reduce_mean(tf.cast(gray, tf.float32)) + 0.5))
  degenerate = tf.fill(tf.shape(image), level)
  return blend(degenerate, image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with a smoothed image (3x3 kernel, border pixels unchanged)."""
  f = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(f, kernel, [1, 1, 1, 1], padding='VALID')[0]
  smooth = _trunc_uint8(smooth)
  mask = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(mask, smooth, image)
  return blend(degenerate, image, factor)


def shear_x(image, level):
  return _transform(image, tf.stack([1., level, 0., 0., 1., 0., 0., 0.]))


def shear_y(image, level):
  return _transform(image, tf.stack([1., 0., 0., level, 1., 0., 0., 0.]))


def translate_x(image, pixels):
  """out[:, x] = image[:, x + pixels]: content moves left for pixels > 0
  (PIL's and the release's convention); uncovered columns are grey."""
  pixels = tf.cast(pixels, tf.float32)
  return _transform(image, tf.stack([1., 0., pixels, 0., 1., 0., 0., 0.]))


def translate_y(image, pixels):
  """out[y] = image[y + pixels]: content moves up for pixels > 0."""
  pixels = tf.cast(pixels, tf.float32)
  return _transform(image, tf.stack([1., 0., 0., 0., 1., pixels, 0., 0.]))


def cutout(image, pad_size, seed):
  """Grey (128) box rows [cy - pad, cy + pad) x cols [cx - pad, cx + pad),
  clipped to the image, centred at a uniformly random pixel (cy, cx)."""
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
def _check_magnitude(magnitude):
  if isinstance(magnitude, (int, float)) and not isinstance(magnitude, bool):
    if not magnitude >= 0:
      raise ValueError(f'RandAugment magnitude must be >= 0, got {magnitude}')


def apply_op(image, name: str, magnitude, seed, mode: str = 'release'):
  """Applies op `name` at `magnitude` (nominally 0..10) to uint8 `image`.

  Args:
    image: uint8 [H, W, 3].
    name: one of OP_NAMES.
    magnitude: number or scalar tensor >= 0.
    seed: [2] int tensor (random sign, Cutout centre).
    mode: 'release' or 'increasing' (see the module docstring).
  """
  if mode not in MODES:
    raise ValueError(f'Unknown RandAugment mode {mode!r}; one of {MODES}')
  if name not in OP_NAMES:
    raise ValueError(f'Unknown RandAugment op {name!r}; one of {OP_NAMES}')
  _check_magnitude(magnitude)
  # l = m / 10 in float64 so that int(l * c) truncates exactly as the
  # release's Python arithmetic does (e.g. 7/10*40 = 28.000000000000004).
  lvl = tf.cast(magnitude, tf.float64) / MAX_LEVEL
  seed = tf.cast(seed, tf.int64)
  sign_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  release = mode == 'release'

  def as_int(x):
    return tf.cast(x, tf.int32)  # truncation toward zero, as Python int().

  def enhance_factor():
    if release:
      return tf.cast(lvl * 1.8 + 0.1, tf.float32)
    return 1. + _random_sign(lvl * 0.9, sign_seed)

  if name == 'AutoContrast':
    out = autocontrast(image)
  elif name == 'Equalize':
    out = equalize(image)
  elif name == 'Invert':
    out = invert(image)
  elif name == 'Rotate':
    out = rotate(image, _random_sign(lvl * 30., sign_seed))
  elif name == 'Posterize':
    bits = as_int(lvl * 4.)
    out = posterize(image, bits, release=True) if release else posterize(
        image, 8 - bits, release=False)
  elif name == 'Solarize':
    thr = as_int(lvl * 256.)
    out = solarize(image, thr, release=True) if release else solarize(
        image, 256 - thr, release=False)
  elif name == 'SolarizeAdd':
    out = solarize_add(image, as_int(lvl * 110.))
  elif name == 'Color':
    out = color(image, enhance_factor())
  elif name == 'Contrast':
    out = contrast(image, enhance_factor(), release=release)
  elif name == 'Brightness':
    out = brightness(image, enhance_factor())
  elif name == 'Sharpness':
    out = sharpness(image, enhance_factor())
  elif name == 'ShearX':
    out = shear_x(image, _random_sign(lvl * 0.3, sign_seed))
  elif name == 'ShearY':
    out = shear_y(image, _random_sign(lvl * 0.3, sign_seed))
  elif name == 'TranslateX':
    out = translate_x(image, _random_sign(lvl * TRANSLATE_CONST, sign_seed))
  elif name == 'TranslateY':
    out = translate_y(image, _random_sign(lvl * TRANSLATE_CONST, sign_seed))
  else:  # Cutout
    out = cutout(image, as_int(lvl * CUTOUT_CONST), op_seed)
  return tf.ensure_shape(out, image.shape)


def randaugment(image, seed, num_layers: int, magnitude, mode: str = 'release'):
  """`num_layers` uniformly chosen ops, each always applied, on a uint8 image.

  Args:
    image: uint8 [H, W, 3].
    seed: [2] int tensor.
    num_layers: number of ops applied in sequence (>= 0).
    magnitude: shared magnitude (>= 0).
    mode: 'release' or 'increasing' (see the module docstring).
  """
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'randaugment expects uint8 images, got {image.dtype}; '
                    'use randaugment_image for float images')
  if mode not in MODES:
    raise ValueError(f'Unknown RandAugment mode {mode!r}; one of {MODES}')
  if isinstance(num_layers, int) and num_layers < 0:
    raise ValueError(f'num_layers must be >= 0, got {num_layers}')
  _check_magnitude(magnitude)
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


def randaugment_image(image, seed, num_layers: int, magnitude,
                      mode: str = 'release'):
  """RandAugment on an image of any dtype, converted as the release does.

  The release (nfnets/dataset.py `_augment_image`) clips a float image to
  0..255, casts it to uint8 (truncating), augments, and casts back to the
  input dtype. uint8 input goes straight to `randaugment`.

  Args:
    image: [H, W, 3] uint8 or float (0..255 scale; overshoot is clipped).
    seed: [2] int tensor.
    num_layers: number of ops applied in sequence.
    magnitude: shared magnitude.
    mode: 'release' or 'increasing'.

  Returns:
    The augmented image in the input dtype.
  """
  image = tf.convert_to_tensor(image)
  dtype = image.dtype
  if dtype == tf.uint8:
    return randaugment(image, seed, num_layers, magnitude, mode)
  if not dtype.is_floating:
    raise TypeError(f'randaugment_image expects uint8 or float images, got {dtype}')
  out = randaugment(_trunc_uint8(tf.cast(image, tf.float32)), seed, num_layers,
                    magnitude, mode)
  return tf.cast(out, dtype)


def draw_params(seed, num_layers: int, height, width):
  """The random draws `randaugment(image, seed, num_layers, ...)` makes, for
  running the ops elsewhere (device_augment.py) on the same draws.

  The same stateless derivation as `randaugment` / `apply_op`: per layer, the
  op index, the random sign (+-1; Rotate, Shear, Translate and 'increasing'
  enhance factors) and the Cutout centre (row, col).

  Returns:
    (op int32 [L], sign float32 [L], cut int32 [L, 2]).
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num_layers)
  ops, signs, cuts = [], [], []
  for i in range(num_layers):
    choice_seed, op_seed = tf.unstack(
        tf.random.experimental.stateless_split(seeds[i], 2))
    ops.append(tf.random.stateless_uniform(
        [], choice_seed, 0, len(OP_NAMES), dtype=tf.int32))
    sign_seed, cut_seed = tf.unstack(tf.random.experimental.stateless_split(op_seed, 2))
    signs.append(_random_sign(1., sign_seed))
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(cut_seed, 2))
    cuts.append(tf.stack([
        tf.random.stateless_uniform([], s1, 0, height, dtype=tf.int32),
        tf.random.stateless_uniform([], s2, 0, width, dtype=tf.int32)]))
  if not num_layers:
    return (tf.zeros([0], tf.int32), tf.zeros([0], tf.float32),
            tf.zeros([0, 2], tf.int32))
  return tf.stack(ops), tf.stack(signs), tf.stack(cuts)
