"""Device (JAX) augmentation == the host (TF) path on the same images and draws.

Each op at magnitudes 0, 5, 10, 15 (both modes), RandAugment's draws and
layers, MixUp/CutMix, and whole pipeline batches (host path vs device path).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from nfnets.data import device_augment as dev
from nfnets.data import mix as mix_lib
from nfnets.data import randaugment as ra
import test_images

MAGNITUDES = (0, 5, 10, 15)
SIZE = 64
NUM_IMAGES = 3


def _images():
  rng = np.random.default_rng(0)
  out = []
  for i in range(NUM_IMAGES):
    pic = test_images.photo(rng, SIZE, SIZE).astype(np.float32)
    pic = pic + rng.normal(0, 20, pic.shape)  # texture: non-trivial histograms
    if i == 2:
      pic = 100 + 0.2 * pic  # low contrast (AutoContrast / Equalize stretch it)
    out.append(np.clip(pic, 0, 255).astype(np.uint8))
  return np.stack(out)


def _op_draws(op_seed):
  """sign and Cutout centre as apply_op derives them from its seed."""
  sign_seed, cut_seed = tf.unstack(tf.random.experimental.stateless_split(
      tf.constant(op_seed, tf.int64), 2))
  sign = -1. if tf.random.stateless_uniform([], sign_seed) < 0.5 else 1.
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(cut_seed, 2))
  cut = [int(tf.random.stateless_uniform([], s, 0, SIZE, dtype=tf.int32)) for s in (s1, s2)]
  return sign, cut


def _assert_close(host, device, what):
  host, device = np.asarray(host, np.int32), np.asarray(device, np.int32)
  diff = np.abs(host - device)
  assert diff.max() <= 255
  frac_ok = np.mean(diff <= 1)
  assert frac_ok >= 0.999, f'{what}: {1 - frac_ok:.4%} of pixels differ by > 1'


@pytest.fixture(scope='module')
def layer_fn():
  return jax.jit(dev.apply_layer, static_argnums=(4, 5))


@pytest.mark.parametrize('mode', ra.MODES)
def test_each_op_matches_host(layer_fn, mode):
  images = _images()
  names = ra.OP_NAMES
  seeds = [[7, 100 + i] for i in range(NUM_IMAGES)]
  draws = [_op_draws(s) for s in seeds]
  batch = np.repeat(images, len(names), axis=0)  # [image][op]
  ops = np.tile(np.arange(len(names), dtype=np.int32), NUM_IMAGES)
  signs = np.repeat(np.array([d[0] for d in draws], np.float32), len(names))
  cuts = np.repeat(np.array([d[1] for d in draws], np.int32), len(names), axis=0)
  for m in MAGNITUDES:
    device = np.asarray(layer_fn(batch, ops, signs, cuts, float(m), mode))
    for i in range(NUM_IMAGES):
      for j, name in enumerate(names):
        host = ra.apply_op(tf.constant(images[i]), name, m, tf.constant(seeds[i], tf.int64),
                           mode).numpy()
        _assert_close(host, device[i * len(names) + j], f'{name} m={m} {mode}')


def test_randaugment_layers_and_draws_match_host():
  """draw_params reproduces randaugment's own draws: 4 layers end to end."""
  images = _images()
  seeds = [[3, i] for i in range(NUM_IMAGES)]
  draws = [ra.draw_params(tf.constant(s, tf.int64), 4, SIZE, SIZE) for s in seeds]
  ops, signs, cuts = (np.stack([d[k].numpy() for d in draws]) for k in range(3))
  device = jax.jit(dev.randaugment_batch, static_argnums=(4,))(images, ops, signs, cuts, 15.)
  for i in range(NUM_IMAGES):
    host = ra.randaugment(tf.constant(images[i]), tf.constant(seeds[i], tf.int64), 4, 15)
    _assert_close(host.numpy(), device[i], f'randaugment image {i}')


def test_draw_distribution_chi_square():
  """Op index uniform over the 16 ops, sign fair, over 10k draws (layers of
  many seeds); chi-square at p = 0.001."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  draw = tf.function(lambda s: ra.draw_params(s, 10, 192, 192), autograph=False)
  ops, signs, cuts = [], [], []
  for i in range(1000):
    o, s, c = draw(tf.constant([11, i], tf.int64))
    ops.append(o.numpy()); signs.append(s.numpy()); cuts.append(c.numpy())
  ops, signs, cuts = np.concatenate(ops), np.concatenate(signs), np.concatenate(cuts)
  assert ops.size == 10000
  counts = np.bincount(ops, minlength=16)
  assert stats.chisquare(counts).pvalue > 1e-3, counts
  assert set(np.unique(signs)) == {-1., 1.}
  assert stats.chisquare([np.sum(signs < 0), np.sum(signs > 0)]).pvalue > 1e-3
  assert cuts.min() == 0 and cuts.max() == 191
  assert stats.chisquare(np.bincount(cuts[:, 0] // 12, minlength=16)).pvalue > 1e-3


def test_mixup_cutmix_match_host():
  rng = np.random.default_rng(1)
  b = 6
  raw = rng.integers(0, 256, (2 * b, 40, 48, 3), dtype=np.uint8)
  labels = tf.one_hot(rng.integers(0, 5, 2 * b), 5) * 0.9 + 0.02
  params = mix_lib.sample_params(tf.constant([1, 2], tf.int64), b, 40, 48, 0.2, True)
  host_images, host_labels = mix_lib.apply_params(raw, labels, params, 0.2, True)
  first, second = mix_lib.pair_indices(b, 0.2, True)
  pairs = np.stack([raw[first], raw[second]], 1)
  lam, box = params['lam'].numpy(), params['box'].numpy()
  assert 0 < (box[:, 1] - box[:, 0]).max()  # some CutMix box is not empty
  images = jax.jit(dev.mix_pairs)(pairs, lam, box)
  np.testing.assert_allclose(images, host_images.numpy(), atol=1e-3)
  lab = np.stack([labels.numpy()[first], labels.numpy()[second]], 1)
  np.testing.assert_allclose(dev.mix_labels(jnp.asarray(lab), lam, box, 40, 48),
                             host_labels.numpy(), atol=1e-6)
