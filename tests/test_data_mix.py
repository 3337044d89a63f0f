"""MixUp / CutMix as in the release: two raw images per output, each used once;
RandAugment on the mixed image (or before mixing when asked)."""
import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from nfnets import data
from nfnets.data import mix
from nfnets.data import preprocess
from nfnets.data import randaugment as ra_lib
from test_data_pipeline import data_config  # base_config().data + overrides

SEED = tf.constant([3, 4], tf.int64)
N = 64  # examples of the constant-colour source


def _value(k):
  return (17 * k + 3) % 256  # distinct grey level per example (17 is odd)


def _constant_source():
  """Example k: a constant grey PNG of value _value(k), label k (N classes)."""
  pngs = []
  for k in range(N):
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), _value(k), np.uint8)).save(buf, format='PNG')
    pngs.append(buf.getvalue())
  return data.InMemorySource(pngs, np.arange(N), num_classes=N)


def _pixels(images):
  mean = np.asarray(preprocess.MEAN_RGB, np.float32)
  std = np.asarray(preprocess.STDDEV_RGB, np.float32)
  return np.round(images.astype(np.float32) * std + mean).astype(np.int64)


def _train(source, steps, **kw):
  cfg = data_config(**dict(dict(name='in_memory', image_size=16, train_split='train',
                                randaug='', label_smoothing=0.0, shuffle_buffer=32), **kw))
  it = data.create_train_iterator(cfg, global_batch_size=8, seed=1, process_index=0,
                                  process_count=1, with_ids=True, source=source)
  return [next(it) for _ in range(steps)]


# ---------------------------------------------------------------------------
# mix.py on constant images (pixel provenance visible).
def _raw(n=8, h=8, w=10, c=5):
  images = tf.constant(np.arange(n, dtype=np.float32)[:, None, None, None]
                       * np.ones([n, h, w, 3], np.float32))
  labels = preprocess.one_hot_smoothed(tf.range(n) % c, c, 0.1)
  return images, labels


@pytest.mark.parametrize('b', [1, 4, 5])
@pytest.mark.parametrize('alpha,cut', [(0.2, False), (0.0, True), (0.2, True)])
def test_pair_indices_use_every_raw_example_once(b, alpha, cut):
  first, second = mix.pair_indices(b, alpha, cut)
  assert sorted(np.concatenate([first, second]).tolist()) == list(range(2 * b))
  if b == 4 and alpha and cut:  # The release's layout for 4b raw images.
    np.testing.assert_array_equal(first, [0, 1, 4, 5])
    np.testing.assert_array_equal(second, [2, 3, 6, 7])


def test_mixup_pairs_first_and_second_half():
  images, labels = _raw()
  out_i, out_l, lam = mix.mixup(images, labels, SEED, 0.2)
  lam, out_i, out_l = lam.numpy(), out_i.numpy(), out_l.numpy()
  assert out_i.shape[0] == 4 and np.all((lam >= 0) & (lam <= 1))
  np.testing.assert_allclose(out_i[:, 0, 0, 0], lam * np.arange(4) + (1 - lam) * np.arange(4, 8),
                             rtol=1e-5, atol=1e-5)
  labels = labels.numpy()
  np.testing.assert_allclose(out_l, lam[:, None] * labels[:4] + (1 - lam[:, None]) * labels[4:],
                             rtol=1e-5)


def test_cutmix_area_matches_label_weight():
  images, labels = _raw(n=16, h=16, w=12)
  out_i, out_l, area = [t.numpy() for t in mix.cutmix(images, labels, SEED)]
  for i in range(8):
    assert set(np.unique(out_i[i])) <= {float(i), float(8 + i)}
    assert np.mean(out_i[i, ..., 0] == 8 + i) == pytest.approx(area[i])
  labels = labels.numpy()
  np.testing.assert_allclose(out_l, (1 - area[:, None]) * labels[:8] + area[:, None] * labels[8:],
                             rtol=1e-5)
  assert 0 < area.mean() < 1


def test_mixup_cutmix_halves():
  images, labels = _raw(n=8)
  out_i, out_l = [t.numpy() for t in mix.mixup_cutmix(images, labels, SEED, 0.2, True)]
  assert out_i.shape[0] == 4
  np.testing.assert_allclose(out_l.sum(-1), 1., rtol=1e-5)
  for i, (a, b) in enumerate([(0, 2), (1, 3)]):  # MixUp: one blended constant.
    vals = np.unique(out_i[i])
    assert len(vals) == 1 and min(a, b) - 1e-4 <= vals[0] <= max(a, b) + 1e-4
  for i, (a, b) in zip((2, 3), [(4, 6), (5, 7)]):  # CutMix: pixels of the pair only.
    assert set(np.unique(out_i[i])) <= {float(a), float(b)}
  same_i, same_l = mix.mixup_cutmix(images, labels, SEED, 0.0, False)
  assert same_i is images and same_l is labels
  with pytest.raises(ValueError, match='even'):
    mix.mixup(images[:3], labels[:3], SEED, 0.2)


# ---------------------------------------------------------------------------
# The train pipeline.
def _check_pairs(batches, num_mixup):
  for b in batches:
    ids, partners = b['ids'], b['partner_ids']
    raw = np.concatenate([ids, partners])
    assert len(set(raw.tolist())) == len(raw) == 16  # each raw example once per step
    assert np.all(ids != partners)
    px = _pixels(b['images'])
    for r in range(8):
      va, vb = _value(ids[r]), _value(partners[r])
      w_self, w_partner = b['labels'][r, ids[r]], b['labels'][r, partners[r]]
      assert w_self + w_partner == pytest.approx(1., abs=1e-5)
      if r < num_mixup:  # MixUp: a constant image, the label's blend.
        assert px[r].max() - px[r].min() <= 1
        assert px[r].mean() == pytest.approx(w_self * va + w_partner * vb, abs=1.)
      else:              # CutMix: the pair's pixels, the partner's area = its weight.
        assert set(np.unique(px[r])) <= {va, vb}
        assert np.mean(px[r, ..., 0] == vb) == pytest.approx(w_partner, abs=1e-5)


def test_every_raw_example_once_per_step_and_pixels_match_ids():
  source = _constant_source()
  _check_pairs(_train(source, 3, mixup_alpha=0.2, cutmix=True), num_mixup=4)
  _check_pairs(_train(source, 2, mixup_alpha=0.0, cutmix=True), num_mixup=0)
  _check_pairs(_train(source, 2, mixup_alpha=0.4, cutmix=False), num_mixup=8)
  # Without mixing: one raw example per output, no partner.
  plain = _train(source, 2, mixup_alpha=0.0, cutmix=False)
  assert 'partner_ids' not in plain[0] and plain[0]['ids'].shape == (8,)
  assert len(set(np.concatenate([b['ids'] for b in plain]).tolist())) == 16


def _probe(monkeypatch):
  """Replaces RandAugment by 'fill with the image's maximum' and records its
  inputs (a non-linear op, so before/after mixing give different pixels)."""
  seen = []

  def record(image):
    seen.append(image.copy())
    return image

  def fake_randaugment(image, seed, num_layers, magnitude, mode='release'):
    del seed, num_layers, magnitude, mode
    image = tf.numpy_function(record, [image], tf.uint8, stateful=True)
    image.set_shape([16, 16, 3])
    return tf.fill(tf.shape(image), tf.reduce_max(image))

  monkeypatch.setattr(ra_lib, 'randaugment', fake_randaugment)
  return seen


def test_randaugment_sees_the_mixed_image(monkeypatch):
  seen = _probe(monkeypatch)
  batches = _train(_constant_source(), 2, mixup_alpha=0.0, cutmix=True, randaug='405')
  assert seen and data_config().augment_before_mix is False  # the default
  # Every RandAugment input is a CutMix output: one or two grey levels of
  # the source images, and each partial-box output of the batches was seen
  # (the pipeline may have prepared later batches too).
  levels = {_value(k) for k in range(N)}
  seen_levels = [frozenset(np.unique(s).tolist()) for s in seen]
  assert all(len(v) <= 2 and v <= levels for v in seen_levels)
  partial = {frozenset((_value(a), _value(p)))
             for b in batches for a, p in zip(b['ids'], b['partner_ids'])
             if 0 < b['labels'][list(b['ids']).index(a), p] < 1}
  assert partial and partial <= set(seen_levels)
  for b in batches:
    px = _pixels(b['images'])
    for r in range(8):
      va, vb = _value(b['ids'][r]), _value(b['partner_ids'][r])
      w_partner = b['labels'][r, b['partner_ids'][r]]
      expect = vb if w_partner == 1 else va if w_partner == 0 else max(va, vb)
      assert np.all(px[r] == expect)  # the probe's output is the batch image


def test_randaugment_before_mix_sees_raw_images(monkeypatch):
  seen = _probe(monkeypatch)
  batches = _train(_constant_source(), 2, mixup_alpha=0.0, cutmix=True, randaug='405',
                   augment_before_mix=True)
  assert seen and all(len(np.unique(s)) == 1 for s in seen)  # raw constant images
  _check_pairs(batches, num_mixup=0)  # mixing happened after, untouched by the probe
