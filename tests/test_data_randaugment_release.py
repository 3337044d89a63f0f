"""RandAugment and preprocessing against the NFNet release's recipe.

Reference behaviour: deepmind-research nfnets/autoaugment.py
(`distort_image_with_randaugment`, translate_const 100, cutout_const 40) and
nfnets/dataset.py (`_augment_image`, `_preprocess_image`). Expected values are
computed here independently in NumPy from the release's formulas.
"""
import numpy as np
from PIL import Image, ImageEnhance
import pytest
import tensorflow as tf

from nfnets.data import preprocess
from nfnets.data import randaugment as ra

SEEDS = [tf.constant([s, 11], tf.int64) for s in range(8)]


def _coded(size):
  """uint8 image whose columns (and rows) are identifiable; never 128 in ch 2."""
  y, x = np.mgrid[:size, :size]
  return np.stack([x % 256, y % 256, (x // 256) + 2 * (y // 256)], -1).astype(np.uint8)


def _x_shift(out, img):
  """(fill columns, signed shift s with out[:, x] = img[:, x + s])."""
  fill = np.all(out == ra.FILL_VALUE, axis=(0, 2))
  kept = np.nonzero(~fill)[0]
  if not len(kept):
    return int(fill.sum()), None
  x0 = kept[0]
  src = int(out[0, x0, 0]) + 256 * (int(out[0, x0, 2]) % 2)
  shift = src - x0
  np.testing.assert_array_equal(out[:, kept], img[:, kept + shift])
  return int(fill.sum()), shift


# ---------------------------------------------------------------------------
# Translate and Cutout: absolute pixels, whatever the image size.
@pytest.mark.parametrize('magnitude', [3, 5])
def test_translate_pixels_do_not_depend_on_image_size(magnitude):
  expect = magnitude * 10  # magnitude / 10 * 100 px
  for size in (64, 384):
    img = _coded(size)
    signs = set()
    for seed in SEEDS:
      out = ra.apply_op(tf.constant(img), 'TranslateX', magnitude, seed).numpy()
      n_fill, shift = _x_shift(out, img)
      assert n_fill == expect and abs(shift) == expect, (size, n_fill, shift)
      signs.add(np.sign(shift))
      # TranslateY: same extent along rows.
      out_y = ra.apply_op(tf.constant(img), 'TranslateY', magnitude, seed).numpy()
      assert np.all(out_y == ra.FILL_VALUE, axis=(1, 2)).sum() == expect
    assert signs == {-1, 1}  # random sign


def test_translate_at_magnitude_15_is_150px():
  img = _coded(384)
  out = ra.apply_op(tf.constant(img), 'TranslateX', 15, SEEDS[0]).numpy()
  n_fill, shift = _x_shift(out, img)
  assert n_fill == 150 and abs(shift) == 150
  # On a 64 px image the same 150 px leave nothing of the image.
  small = ra.apply_op(tf.constant(_coded(64)), 'TranslateX', 15, SEEDS[0]).numpy()
  np.testing.assert_array_equal(small, ra.FILL_VALUE)


def _box(out):
  ys, xs = np.nonzero(np.all(out == ra.FILL_VALUE, axis=-1))
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  assert len(ys) == (y1 - y0) * (x1 - x0)  # a filled rectangle
  return y0, y1, x0, x1


@pytest.mark.parametrize('magnitude,side', [(5, 40), (7, 56), (15, 120)])
def test_cutout_box_pixels_do_not_depend_on_image_size(magnitude, side):
  # half-size int(m/10*40): 20, 28 (7/10*40 = 28.000000000000004), 60.
  for size in (64, 384):
    img = np.zeros([size, size, 3], np.uint8)
    full = 0
    for s in range(24):
      out = ra.apply_op(tf.constant(img), 'Cutout', magnitude,
                        tf.constant([s, 3], tf.int64)).numpy()
      y0, y1, x0, x1 = _box(out)
      for lo, hi in ((y0, y1), (x0, x1)):
        assert hi - lo <= side
        assert hi - lo == side or lo == 0 or hi == size  # clipped at a border
      full += (y1 - y0 == side) + (x1 - x0 == side)
    if side < size:
      assert full > 0  # an extent away from the borders is exactly `side`
    else:
      assert full == 0


# ---------------------------------------------------------------------------
# Contrast: the release's grey level is (sum of the histogram) / 256.
def _release_contrast_np(img, magnitude):
  gray = img.astype(np.float64) @ np.array([0.2989, 0.587, 0.114])
  hist, _ = np.histogram(gray, bins=256, range=(0, 255))
  level = np.float32(hist.sum()) / np.float32(256.)
  level = np.clip(level, 0, 255).astype(np.uint8).astype(np.float32)
  factor = np.float32(magnitude / 10. * 1.8 + 0.1)
  out = level + factor * (img.astype(np.float32) - level)
  return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize('h,w', [(8, 8), (16, 16), (20, 32), (224, 224), (256, 256), (300, 200)])
@pytest.mark.parametrize('magnitude', [0, 3, 9, 15])
def test_contrast_release_formula(h, w, magnitude):
  rng = np.random.default_rng(h * 1000 + w)
  img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  got = ra.apply_op(tf.constant(img), 'Contrast', magnitude, SEEDS[0]).numpy()
  np.testing.assert_array_equal(got, _release_contrast_np(img, magnitude))


def test_contrast_release_grey_level_counts_pixels_not_values():
  # 16x16 = 256 pixels: grey level 1, for a dark and for a bright image alike.
  for value in (10, 250):
    img = np.full([16, 16, 3], value, np.uint8)
    grey = ra.contrast(tf.constant(img), 0.).numpy()
    np.testing.assert_array_equal(grey, 1)
  big = np.full([64, 64, 3], 10, np.uint8)  # 4096 / 256 = 16
  np.testing.assert_array_equal(ra.contrast(tf.constant(big), 0.).numpy(), 16)
  huge = np.full([300, 300, 3], 10, np.uint8)  # 351.6 -> clipped to 255
  np.testing.assert_array_equal(ra.contrast(tf.constant(huge), 0.).numpy(), 255)


def test_contrast_increasing_mode_uses_the_mean_grey():
  img = np.random.default_rng(0).integers(0, 120, (30, 30, 3), dtype=np.uint8)
  grey = ra.contrast(tf.constant(img), 0., release=False).numpy()
  pil = np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(0.0))
  assert len(np.unique(grey)) == 1
  assert abs(int(grey[0, 0, 0]) - int(pil[0, 0, 0])) <= 1


# ---------------------------------------------------------------------------
# The other release quirks (uint8 conversions of Python ints in the release).
@pytest.mark.parametrize('magnitude', [0, 1, 5, 9, 10, 12, 15])
def test_solarize_release_threshold_wraps_mod_256(magnitude):
  img = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
  thr = int(magnitude / 10 * 256) % 256
  expect = np.where(img < thr, img, 255 - img)
  got = ra.apply_op(tf.constant(img), 'Solarize', magnitude, SEEDS[0]).numpy()
  np.testing.assert_array_equal(got, expect)
  if magnitude == 10:  # threshold 256 -> 0: every pixel inverted
    np.testing.assert_array_equal(got, 255 - img)


@pytest.mark.parametrize('magnitude', [0, 2, 3, 5, 10, 15, 20, 25])
def test_posterize_release_shift_is_uint8_clamped_to_7(magnitude):
  img = np.random.default_rng(2).integers(0, 256, (12, 12, 3), dtype=np.uint8)
  bits = int(magnitude / 10 * 4)
  shift = min((8 - bits) % 256, 7)
  expect = ((img.astype(int) >> shift) << shift).astype(np.uint8)
  got = ra.apply_op(tf.constant(img), 'Posterize', magnitude, SEEDS[0]).numpy()
  np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize('name', ['Color', 'Brightness'])
@pytest.mark.parametrize('magnitude', [2, 9, 15])
def test_enhance_blend_truncates(name, magnitude):
  img = np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8)
  f = img.astype(np.float32)
  if name == 'Brightness':
    degenerate = np.zeros_like(f)
  else:  # tf.image.rgb_to_grayscale: weights, then x 255.5 / 255, truncated.
    g = (f / np.float32(255.)) @ np.array([0.2989, 0.587, 0.114], np.float32)
    degenerate = np.floor(g * np.float32(255.5))[..., None].repeat(3, -1)
  factor = np.float32(magnitude / 10. * 1.8 + 0.1)
  expect = np.clip(degenerate + factor * (f - degenerate), 0, 255).astype(np.uint8)
  got = ra.apply_op(tf.constant(img), name, magnitude, SEEDS[0]).numpy()
  if name == 'Brightness':
    np.testing.assert_array_equal(got, expect)
  else:  # the grey level's 3-term float sum may round differently
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1
    assert np.mean(got == expect) > 0.99


def test_autocontrast_release_arithmetic():
  img = np.random.default_rng(5).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  img[..., 1] = img[..., 1] // 3 + 17
  img[..., 2] = 99  # constant channel: unchanged
  expect = img.copy()
  for c in range(2):
    f = img[..., c].astype(np.float32)
    lo, hi = f.min(), f.max()
    scale = np.float32(255.) / (hi - lo)
    expect[..., c] = np.clip(f * scale + (-lo * scale), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(ra.apply_op(tf.constant(img), 'AutoContrast', 5, SEEDS[0]).numpy(), expect)


def test_sharpness_release_smoothing_truncates():
  img = np.random.default_rng(6).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  f = img.astype(np.float32)
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13.)
  smooth = f.copy()
  for y in range(1, 8):
    for x in range(1, 10):
      smooth[y, x] = np.floor(np.einsum('ij,ijc->c', k, f[y - 1:y + 2, x - 1:x + 2]))
  factor = np.float32(0.0 * 1.8 + 0.1)  # magnitude 0: mostly the smoothed image
  expect = np.clip(smooth + factor * (f - smooth), 0, 255).astype(np.uint8)
  got = ra.apply_op(tf.constant(img), 'Sharpness', 0, SEEDS[0]).numpy()
  assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1  # conv sum order
  assert np.mean(got == expect) > 0.9
  np.testing.assert_array_equal(got[0], img[0])  # border rows/cols: original


def test_op_list_and_chosen_op_always_applied():
  assert ra.OP_NAMES == (
      'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
      'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
      'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
  # Every op changes this image at magnitude 10, so one layer always does.
  img = np.random.default_rng(4).integers(10, 200, (128, 128, 3), dtype=np.uint8)
  fn = tf.function(lambda s: ra.randaugment(tf.constant(img), s, 1, 10))
  for s in range(40):
    out = fn(tf.constant([s, 5], tf.int64)).numpy()
    assert not np.array_equal(out, img), s


def test_randaugment_image_converts_like_the_release():
  # Float input is clipped then truncated to uint8; 0 layers shows just that.
  img = tf.constant([[[-5., 10.7, 255.9], [300., 0.2, 127.99]]])
  out = ra.randaugment_image(img, SEEDS[0], 0, 10)
  assert out.dtype == tf.float32
  np.testing.assert_array_equal(out.numpy(), [[[0., 10., 255.], [255., 0., 127.]]])
  with pytest.raises(TypeError):
    ra.randaugment_image(tf.zeros([4, 4, 3], tf.int32), SEEDS[0], 1, 5)


def test_bad_arguments_raise():
  img = tf.zeros([8, 8, 3], tf.uint8)
  with pytest.raises(ValueError, match='mode'):
    ra.randaugment(img, SEEDS[0], 1, 5, mode='paper')
  with pytest.raises(ValueError, match='magnitude'):
    ra.apply_op(img, 'Rotate', -1, SEEDS[0])
  with pytest.raises(ValueError, match='op'):
    ra.apply_op(img, 'Blur', 5, SEEDS[0])


# ---------------------------------------------------------------------------
# Level parser.
def test_parse_randaug_release_rule():
  parse = preprocess.parse_randaug
  assert parse('405') == (4, 5)
  assert parse('1015') == (10, 15)
  assert parse('215') == (2, 15)
  assert parse(' 410 ') == (4, 10) and parse(1015) == (10, 15)
  assert parse('1000') == (10, 0)
  assert parse('15') == (2, 15)  # <= 100: magnitude alone, 2 layers
  for off in ('', '0', 0, None, 'off', 'None'):
    assert parse(off) is None
  for bad in ('abc', '4.5', '-405', '4 05', '405x'):
    with pytest.raises(ValueError, match='layers'):
      parse(bad)
  with pytest.raises(ValueError):
    parse(4.05)


# ---------------------------------------------------------------------------
# Eval: the bicubic resize is not clipped.
def test_eval_bicubic_overshoots_0_255_on_a_sharp_edge():
  img = np.zeros([40, 40, 3], np.uint8)
  img[:, 20:] = 255
  out = preprocess.eval_image_resize_crop(tf.constant(img), 64).numpy()
  assert out.shape == (64, 64, 3) and out.dtype == np.float32
  assert out.max() > 255.5 and out.min() < -0.5
  # The train image is uint8, hence within 0..255.
  train = preprocess.train_image_from_crop(tf.constant(img), SEEDS[0], 64).numpy()
  assert train.dtype == np.uint8 and train.max() == 255 and train.min() == 0


def test_center_crop_window_release_arithmetic():
  # crop = int(float32(min(h, w)) / (size + 32) * size).
  for h, w, size in ((500, 375, 224), (10, 1000, 32), (333, 333, 192), (97, 130, 256)):
    _, _, ch, cw = preprocess._center_crop_window(tf.constant([h, w]), size)
    expect = int(np.float32(min(h, w)) / np.float32(size + 32) * np.float32(size))
    assert int(ch) == int(cw) == max(expect, 1)
