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
  # 'increasing' (an option) at its two ends: one compile per magnitude.
  for m in MAGNITUDES if mode == 'release' else (0, 15):
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


# ---------------------------------------------------------------------------
# Whole batches: host path vs device path, and both parallel backends.
@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  from nfnets.data import digits  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare(d)
  return d


def _cfg(digits_dir, **kw):
  from test_data_pipeline import data_config  # pylint: disable=g-import-not-at-top
  base = dict(name='digits', data_dir=digits_dir, train_split='train', image_size=32,
              randaug='405', mixup_alpha=0.2, cutmix=True, label_smoothing=0.1,
              shuffle_buffer=64, num_classes=10)
  base.update(kw)
  return data_config(**base)


def _batches(cfg, n, start_step=0):
  from nfnets import data  # pylint: disable=g-import-not-at-top
  it = data.create_train_iterator(cfg, global_batch_size=16, seed=3, process_index=0,
                                  process_count=1, start_step=start_step)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize('recipe', [
    dict(),                                            # the F0 recipe (RA after mixing)
    dict(augment_before_mix=True, dtype='bfloat16'),   # RA on each raw image
    dict(mixup_alpha=0.0, cutmix=False, randaug='215', randaug_mode='increasing'),
])
def test_device_path_equals_host_path(digits_dir, recipe):
  host = _batches(_cfg(digits_dir, **recipe), 2, start_step=1)
  device_cfg = _cfg(digits_dir, augment_on='device', **recipe)
  raw = _batches(device_cfg, 2, start_step=1)
  transform = jax.jit(dev.make_batch_transform(device_cfg))
  std = np.array(dev.preprocess.STDDEV_RGB, np.float32)
  for h, r in zip(host, raw):
    d = transform({k: v for k, v in r.items()})
    assert d['images'].dtype == h['images'].dtype and d['images'].shape == h['images'].shape
    levels = np.abs(np.asarray(d['images'], np.float32) - np.asarray(h['images'], np.float32)) * std
    tol = 1.01 if recipe.get('dtype') != 'bfloat16' else 1.01 + 0.01 * 255
    assert np.mean(levels <= tol) >= 0.999, np.mean(levels <= tol)
    np.testing.assert_allclose(d['labels'], h['labels'], atol=1e-6)


def test_backends_see_the_same_batches(digits_dir):
  """The transform inside the per-device step: pmap and jit+shard_map give
  the batch the host path gives (per-device sums, summed over devices)."""
  from nfnets.training import parallel  # pylint: disable=g-import-not-at-top
  device_cfg = _cfg(digits_dir, augment_on='device')
  raw = _batches(device_cfg, 1)[0]
  host = _batches(_cfg(digits_dir), 1)[0]
  transform = dev.make_batch_transform(device_cfg)

  def step(state, batch, rng):
    del rng
    sums = {k: jax.lax.psum(jnp.sum(v.astype(jnp.float32) * (1 + jnp.arange(v.shape[0])[
        (...,) + (None,) * (v.ndim - 1)] + jax.lax.axis_index(parallel.AXIS) * v.shape[0])),
                            parallel.AXIS) for k, v in batch.items()}
    return state, sums

  wrapped = dev.with_batch_transform(step, transform)
  rows = np.arange(16, dtype=np.float32) + 1
  want = {k: np.sum(np.asarray(v, np.float32) * rows.reshape((-1,) + (1,) * (v.ndim - 1)))
          for k, v in host.items() if k in ('images', 'labels')}
  for backend in ('pmap', 'jit'):
    dp = parallel.make(ml_collections_config(backend), devices=jax.local_devices()[:4])
    fn = dp.train_step(wrapped)
    _, sums = fn(dp.put_state({'x': np.zeros(())}), dp.put_batch_now(raw), np.zeros(2, np.uint32))
    got = dp.fetch(sums)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-4, err_msg=f'{backend} {k}')


def ml_collections_config(backend):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({'backend': backend, 'fsdp': False})
