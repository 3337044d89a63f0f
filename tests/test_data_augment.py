"""Augmentation invariants: preprocessing, RandAugment ops, MixUp / CutMix."""
import numpy as np
from PIL import Image, ImageOps
import pytest
import tensorflow as tf

from nfnets.data import mix
from nfnets.data import preprocess
from nfnets.data import randaugment as ra

SEED = tf.constant([1, 2], tf.int64)


def _image(h=20, w=24, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# Preprocessing.
def test_parse_randaug():
  assert preprocess.parse_randaug('405') == (4, 5)
  assert preprocess.parse_randaug('415') == (4, 15)
  assert preprocess.parse_randaug(410) == (4, 10)
  for off in (None, '', 'none', '0'):
    assert preprocess.parse_randaug(off) is None
  # The release: an integer <= 100 is a magnitude with 2 layers.
  assert preprocess.parse_randaug('45') == (2, 45)
  with pytest.raises(ValueError):
    preprocess.parse_randaug('4-5')


def _jpeg(h, w):
  return tf.io.encode_jpeg(tf.constant(_image(h, w))).numpy()


def test_inception_crop_window_bounds_and_area():
  jpeg = _jpeg(60, 80)
  for i in range(20):
    seed = tf.constant([i, 7], tf.int64)
    window = preprocess._inception_crop_window(tf.constant([60, 80, 3]), seed, 32).numpy()
    y, x, h, w = window
    assert 0 <= y and 0 <= x and y + h <= 60 and x + w <= 80
    area = h * w / (60 * 80)
    assert 0.08 - 0.02 <= area <= 1.0
    # Aspect within 3/4..4/3 up to integer rounding.
    assert 0.75 * 0.85 <= w / h <= 4 / 3 * 1.15
    crop = preprocess.decode_and_inception_crop(jpeg, seed, 32)
    assert crop.shape == (h, w, 3) and crop.dtype == tf.uint8


def test_inception_crop_center_fallback():
  # 10x1000: no crop with aspect 3/4..4/3 and area >= 8% fits -> centre crop.
  window = preprocess._inception_crop_window(tf.constant([10, 1000, 3]), SEED, 32).numpy()
  side = int(32 / 64 * 10)
  assert list(window) == [(10 - side + 1) // 2, (1000 - side + 1) // 2, side, side]


def test_train_and_eval_image_shapes_and_range():
  crop = tf.constant(_image(37, 23))
  img = preprocess.train_image_from_crop(crop, SEED, 16)
  assert img.shape == (16, 16, 3) and img.dtype == tf.uint8
  ev = preprocess.resize(crop, 16)
  assert ev.dtype == tf.float32 and ev.shape == (16, 16, 3)
  ev = preprocess.decode_eval_jpeg(_jpeg(40, 30), 16)
  assert ev.shape == (16, 16, 3)
  # Constant image stays constant through resize + centre crop.
  const = preprocess.eval_image_resize_crop(tf.fill([40, 30, 3], tf.constant(77, tf.uint8)), 8)
  np.testing.assert_allclose(const.numpy(), 77., atol=1e-3)


def test_normalize_and_range():
  lo, hi = preprocess.normalized_range()
  x = preprocess.normalize(tf.constant([[[0., 0., 0.], [255., 255., 255.]]]))
  assert float(tf.reduce_min(x)) == pytest.approx(lo, abs=1e-5)
  assert float(tf.reduce_max(x)) == pytest.approx(hi, abs=1e-5)
  mean = preprocess.normalize(tf.constant([[preprocess.MEAN_RGB]]))
  np.testing.assert_allclose(mean.numpy(), 0., atol=1e-5)


def test_label_smoothing():
  y = preprocess.one_hot_smoothed(tf.constant([3, 0]), 10, 0.1).numpy()
  np.testing.assert_allclose(y.sum(-1), 1., rtol=1e-6)
  assert y[0, 3] == pytest.approx(0.91) and y[0, 0] == pytest.approx(0.01)


def test_pad_and_random_crop_is_a_shift():
  img = tf.constant(_image(8, 8))
  out = preprocess.pad_and_random_crop(img, SEED, 2).numpy()
  padded = np.pad(img.numpy(), [(2, 2), (2, 2), (0, 0)])
  assert any(np.array_equal(out, padded[dy:dy + 8, dx:dx + 8])
             for dy in range(5) for dx in range(5))


# ---------------------------------------------------------------------------
# RandAugment ops.
@pytest.mark.parametrize('name', ra.OP_NAMES)
def test_op_keeps_shape_dtype_range(name):
  img = tf.constant(_image())
  for magnitude in (0, 5, 10, 15):
    for mode in ra.MODES:
      out = ra.apply_op(img, name, magnitude, SEED, mode)
      assert out.shape == img.shape and out.dtype == tf.uint8
  # Deterministic given the seed.
  a = ra.apply_op(img, name, 7, SEED).numpy()
  b = ra.apply_op(img, name, 7, SEED).numpy()
  np.testing.assert_array_equal(a, b)


PARAMETRIC = ('Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness',
              'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
              'Cutout', 'SolarizeAdd')


@pytest.mark.parametrize('name', PARAMETRIC)
def test_identity_at_magnitude_zero_increasing(name):
  img = tf.constant(_image())
  np.testing.assert_array_equal(ra.apply_op(img, name, 0, SEED, 'increasing').numpy(), img.numpy())


@pytest.mark.parametrize('name', PARAMETRIC)
def test_release_mode_identities(name):
  img = tf.constant(_image())
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    magnitude = 5  # factor 5/10*1.8 + 0.1 = 1.
  elif name == 'Posterize':
    magnitude = 20  # int(20/10*4) = 8 bits kept.
  elif name == 'Solarize':
    magnitude = None  # the uint8 threshold never exceeds 255: no identity.
  else:
    magnitude = 0
  if magnitude is None:
    return
  np.testing.assert_array_equal(ra.apply_op(img, name, magnitude, SEED, 'release').numpy(), img.numpy())


def test_ops_are_not_identity_at_high_magnitude():
  img = tf.constant(_image())
  for name in ra.OP_NAMES:
    if name == 'Solarize':
      continue  # release: weaker with magnitude.
    out = ra.apply_op(img, name, 10, SEED, 'increasing').numpy()
    assert not np.array_equal(out, img.numpy()), name


def test_ops_match_pil():
  arr = _image(16, 18, seed=3)
  arr[..., 1] = arr[..., 1] // 2 + 40  # a channel without full range
  img = tf.constant(arr)
  pil = Image.fromarray(arr)
  np.testing.assert_array_equal(ra.equalize(img).numpy(), np.asarray(ImageOps.equalize(pil)))
  np.testing.assert_array_equal(ra.posterize(img, 3).numpy(), np.asarray(ImageOps.posterize(pil, 3)))
  np.testing.assert_array_equal(ra.solarize(img, 100).numpy(), np.asarray(ImageOps.solarize(pil, 100)))
  np.testing.assert_array_equal(ra.invert(img).numpy(), np.asarray(ImageOps.invert(pil)))
  auto = ra.autocontrast(img).numpy().astype(int)
  assert np.abs(auto - np.asarray(ImageOps.autocontrast(pil)).astype(int)).max() <= 1
  assert auto[..., 1].min() == 0 and auto[..., 1].max() >= 254  # truncating cast
  # PIL semantics outside the release mode: 0 bits is black.
  np.testing.assert_array_equal(ra.posterize(img, 0, release=False).numpy(), 0)


def test_geometric_ops():
  img = tf.constant(_image(9, 9))
  rot = ra.rotate(img, 90.).numpy()
  assert any(np.array_equal(rot, np.rot90(img.numpy(), k)) for k in (1, 3))
  # PIL / release convention: out[x] = in[x + pixels].
  shifted = ra.translate_x(img, 3.).numpy()
  np.testing.assert_array_equal(shifted[:, :-3], img.numpy()[:, 3:])
  np.testing.assert_array_equal(shifted[:, -3:], ra.FILL_VALUE)
  shifted = ra.translate_y(img, -2.).numpy()
  np.testing.assert_array_equal(shifted[2:], img.numpy()[:-2])
  np.testing.assert_array_equal(shifted[:2], ra.FILL_VALUE)


def test_cutout_is_a_filled_box():
  img = tf.zeros([20, 20, 3], tf.uint8)
  out = ra.cutout(img, 3, SEED).numpy()[..., 0]
  ys, xs = np.nonzero(out == ra.FILL_VALUE)
  assert 0 < len(ys) <= 36
  assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_randaugment_layers():
  img = tf.constant(_image())
  out = ra.randaugment(img, SEED, 4, 15).numpy()
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, ra.randaugment(img, SEED, 4, 15).numpy())
  outs = [ra.randaugment(img, tf.constant([s, 0], tf.int64), 2, 9).numpy() for s in range(4)]
  assert len({o.tobytes() for o in outs}) > 1
  with pytest.raises(TypeError):
    ra.randaugment(tf.cast(img, tf.float32), SEED, 1, 5)


# ---------------------------------------------------------------------------
# MixUp / CutMix.


def test_mixup_lambda_distribution():
  lam = mix.sample_beta(SEED, [20000], 0.2).numpy()
  assert lam.mean() == pytest.approx(0.5, abs=0.02)
  # Beta(0.2, 0.2) is U-shaped: most mass near 0 and 1.
  assert np.mean((lam < 0.1) | (lam > 0.9)) > 0.5




def test_cutmix_box_area_is_uniform():
  masks = mix.cutmix_masks(SEED, 4000, 64, 64).numpy()
  area = masks.mean(axis=(1, 2))
  # Unclipped area ~ U(0, 1); clipping at borders only shrinks it.
  assert 0.3 < area.mean() < 0.5
  rows = masks.any(axis=2).sum(1)
  cols = masks.any(axis=1).sum(1)
  np.testing.assert_array_equal(rows * cols, masks.sum(axis=(1, 2)))  # rectangles
