"""Input pipeline: digits builder, batches, sharding, eval coverage, resume."""
import os
import sys

import ml_collections
import numpy as np
import pytest

from nfnets import config as config_lib
from nfnets import data
from nfnets.data import digits
from nfnets.data import preprocess
from nfnets.data import splits

import background

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LO, HI = preprocess.normalized_range()


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare(d)
  return d


def data_config(**kw) -> ml_collections.ConfigDict:
  """base_config().data (every key exists, misspelt keys fail) with overrides;
  the host path (finished batches) unless augment_on='device' is given."""
  cfg = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  cfg.num_classes = None
  cfg.augment_on = 'host'
  cfg.lock()
  cfg.update(kw)
  return cfg


def _cfg(data_dir, **kw):
  base = dict(name='digits', data_dir=data_dir, train_split='train', eval_split='test',
              image_size=32, eval_image_size=32, randaug='', mixup_alpha=0.0,
              cutmix=False, label_smoothing=0.0, shuffle_buffer=256)
  base.update(kw)
  return data_config(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------
# The digits builder.
def test_digits_builder_splits_and_determinism(digits_dir):
  builder = digits.prepare(digits_dir)
  assert builder.info.splits['train'].num_examples == 1497
  assert builder.info.splits['test'].num_examples == 300
  a, b = digits.load_arrays(), digits.load_arrays()
  for split in ('train', 'test'):
    for x, y in zip(a[split], b[split]):
      np.testing.assert_array_equal(x, y)
  ids_train, ids_test = set(a['train'][2]), set(a['test'][2])
  assert not ids_train & ids_test and len(ids_train | ids_test) == 1797
  images, labels, ids = a['test']
  assert images.shape == (300, 32, 32, 3) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(labels, load_digits().target[ids])
  cfg = _cfg(digits_dir)
  assert data.num_examples(cfg, 'train') == 1497
  assert data.num_examples(cfg, 'train[:100]+test') == 400


# ---------------------------------------------------------------------------
# Batches.
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_train_batch_shapes_dtypes_ranges(digits_dir, dtype):
  cfg = _cfg(digits_dir, randaug='405', mixup_alpha=0.2, cutmix=True,
             label_smoothing=0.1, dtype=dtype, image_size=24)
  it = data.create_train_iterator(cfg, global_batch_size=16, seed=0, process_index=0,
                                  process_count=1)
  for batch in _take(it, 2):
    assert set(batch) == {'images', 'labels'}
    assert batch['images'].shape == (16, 24, 24, 3)
    assert batch['images'].dtype == np.dtype(dtype if dtype == 'float32' else 'bfloat16')
    img = batch['images'].astype(np.float32)
    assert LO - 0.02 <= img.min() and img.max() <= HI + 0.02
    assert batch['labels'].shape == (16, 10) and batch['labels'].dtype == np.float32
    assert batch['labels'].min() >= 0
    np.testing.assert_allclose(batch['labels'].sum(-1), 1., rtol=1e-5)
    # Label smoothing is visible: no exact zeros.
    assert batch['labels'].min() >= 0.01 - 1e-6


def test_eval_batch_shapes(digits_dir):
  cfg = _cfg(digits_dir, eval_image_size=40, dtype='bfloat16')
  it = data.create_eval_iterator(cfg, global_batch_size=64, process_index=0,
                                 process_count=1)
  batches = list(it)
  assert len(batches) == len(it) == 5
  assert it.num_examples == 300 and it.num_skipped == 0 and it.skipped == []
  for batch in batches:
    assert set(batch) == {'images', 'labels', 'mask'}
    assert batch['images'].shape == (64, 40, 40, 3)
    assert batch['labels'].shape == (64,) and batch['labels'].dtype == np.int32
    assert batch['mask'].dtype == np.float32
  assert sum(b['mask'].sum() for b in batches) == 300
  img = batches[0]['images'].astype(np.float32)
  # Eval images are not clipped after the bicubic resize (as in the
  # release), so they may overshoot the normalised range a little; the
  # bicubic kernel's negative lobes bound that well below a quarter of it.
  margin = 0.25 * (HI - LO)
  assert LO - margin <= img.min() and img.max() <= HI + margin


def test_fake_dataset_any_resolution():
  cfg = data_config(
      name='fake', image_size=48, eval_image_size=56, num_classes=7, randaug='405',
      mixup_alpha=0.2, cutmix=True, label_smoothing=0.1, shuffle_buffer=64,
      train_split='train', eval_split='validation',
      fake_train_examples=100, fake_eval_examples=10)
  assert data.num_examples(cfg, 'train') == 100
  assert data.num_classes(cfg) == 7
  batch = next(data.create_train_iterator(cfg, global_batch_size=8, seed=1, process_count=1,
                                          process_index=0))
  assert batch['images'].shape == (8, 48, 48, 3) and batch['labels'].shape == (8, 7)
  batches = list(data.create_eval_iterator(cfg, global_batch_size=8, process_count=1,
                                           process_index=0))
  assert batches[0]['images'].shape == (8, 56, 56, 3)
  assert len(batches) == 2 and sum(b['mask'].sum() for b in batches) == 10


# ---------------------------------------------------------------------------
# Per-host sharding.
def _host_epoch_ids(cfg, p, count, per_host, n_host):
  it = data.create_train_iterator(cfg, global_batch_size=per_host * count, seed=5,
                                  process_index=p, process_count=count, with_ids=True)
  ids = []
  while len(ids) < n_host:
    ids.extend(next(it)['ids'].reshape(-1).tolist())
  return ids[:n_host]


def test_train_shards_disjoint_and_covering(digits_dir):
  cfg = _cfg(digits_dir, num_chunks=3)
  all_ids = set(digits.load_arrays()['train'][2].tolist())
  count = 3
  n_host = 1497 // count
  shards = [_host_epoch_ids(cfg, p, count, 64, n_host) for p in range(count)]
  for ids in shards:
    assert len(set(ids)) == n_host  # one epoch = each host example once
  assert sum(len(set(s)) for s in shards) == len(set().union(*map(set, shards)))
  assert set().union(*map(set, shards)) == all_ids  # 1497 % 3 == 0: covering


def test_train_shards_drop_remainder(digits_dir):
  cfg = _cfg(digits_dir, train_split='train[:10]')
  shards = [set(_host_epoch_ids(cfg, p, 4, 2, 2)) for p in range(4)]
  assert all(len(s) == 2 for s in shards)
  assert len(set().union(*shards)) == 8  # 10 // 4 * 4, disjoint


@pytest.mark.parametrize('count', [1, 3, 7])
def test_eval_covers_every_example_once(digits_dir, count):
  cfg = _cfg(digits_dir)
  test_ids = sorted(digits.load_arrays()['test'][2].tolist())
  seen, num_batches = [], set()
  for p in range(count):
    batches = list(data.create_eval_iterator(
        cfg, global_batch_size=16 * count, process_index=p, process_count=count,
        with_ids=True))
    num_batches.add(len(batches))
    for b in batches:
      real = b['mask'] > 0
      seen.extend(b['ids'][real].tolist())
      assert np.all(b['ids'][~real] == -1)
  assert len(num_batches) == 1  # every host yields the same number of batches
  assert sorted(seen) == test_ids


# ---------------------------------------------------------------------------
# Determinism and resumption.
def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_resume_is_exact_and_does_not_replay(digits_dir):
  cfg = _cfg(digits_dir, randaug='405', mixup_alpha=0.2, cutmix=True,
             label_smoothing=0.1, num_chunks=4, shuffle_buffer=50,
             train_split='train[:300]')
  kw = dict(global_batch_size=16, seed=3, process_index=0, process_count=1, with_ids=True)
  fresh = _take(data.create_train_iterator(cfg, **kw), 14)
  # With mixing a step reads 32 raw examples: step 9 starts at raw example
  # 288 of 300 (the resumed batches cross epochs); step 11 = raw example 52
  # of the second epoch.
  for k in (9, 11):
    resumed = _take(data.create_train_iterator(cfg, start_step=k, **kw), 3)
    _assert_batches_equal(fresh[k:k + 3], resumed)
  # Also with RandAugment before mixing.
  before = _cfg(digits_dir, randaug='405', mixup_alpha=0.2, cutmix=True,
                augment_before_mix=True, num_chunks=4, shuffle_buffer=50,
                train_split='train[:300]')
  _assert_batches_equal(_take(data.create_train_iterator(before, **kw), 11)[9:],
                        _take(data.create_train_iterator(before, start_step=9, **kw), 2))
  # Without mixing: the order depends on the seed only, and each epoch
  # covers the split once, in a different order.
  plain = _cfg(digits_dir, num_chunks=4, shuffle_buffer=50, train_split='train[:300]')
  kw = dict(kw, global_batch_size=32)
  plain_batches = _take(data.create_train_iterator(plain, **kw), 19)
  other = next(data.create_train_iterator(plain, **dict(kw, seed=4)))
  np.testing.assert_array_equal(
      next(data.create_train_iterator(_cfg(digits_dir, num_chunks=4, shuffle_buffer=50,
                                           train_split='train[:300]', randaug='405'),
                                      **kw))['ids'], plain_batches[0]['ids'])
  assert not np.array_equal(other['ids'], plain_batches[0]['ids'])
  ids = np.concatenate([b['ids'] for b in plain_batches])
  assert len(set(ids[:300].tolist())) == 300
  assert set(ids[:300].tolist()) == set(ids[300:600].tolist())
  assert not np.array_equal(ids[:300], ids[300:600])
  _assert_batches_equal(plain_batches[12:14],
                        _take(data.create_train_iterator(plain, start_step=12, **kw), 2))


def test_resume_fake_exact():
  cfg = data_config(
      name='fake', image_size=16, num_classes=5, randaug='', mixup_alpha=0.2,
      cutmix=True, shuffle_buffer=16, train_split='train', fake_train_examples=50,
      num_chunks=3)
  kw = dict(global_batch_size=8, seed=0, process_index=0, process_count=1)
  fresh = _take(data.create_train_iterator(cfg, **kw), 9)
  _assert_batches_equal(fresh[6:9], _take(data.create_train_iterator(cfg, start_step=6, **kw), 3))


_HASH_SCRIPT = r'''
import hashlib, sys, ml_collections
from nfnets import config as config_lib
from nfnets import data
from nfnets.data import digits
digits.prepare(sys.argv[1])
for augment_on in ('host', 'device'):
  cfg = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  cfg.update(dict(name='digits', data_dir=sys.argv[1], train_split='train',
      image_size=32, randaug='405', mixup_alpha=0.2, cutmix=True,
      label_smoothing=0.1, shuffle_buffer=100, num_classes=10, num_chunks=4,
      augment_on=augment_on))
  it = data.create_train_iterator(cfg, global_batch_size=32, seed=11,
                                  start_step=3, process_index=0,
                                  process_count=1)
  h = hashlib.sha256()
  for _ in range(2):
    b = next(it)
    for k in sorted(b):
      h.update(b[k].tobytes())
  print('HASH', augment_on, h.hexdigest())
'''


@background.job
def fresh_process_hashes(tmp):
  """A fresh process's (fresh TF runtime, its own copy of the digits)
  output: the hash of train batches 3 and 4, resumed at step 3, per
  augment_on."""
  run = background.run([sys.executable, '-c', _HASH_SCRIPT, str(tmp)],
                       timeout=600, env=background.env(PYTHONPATH=REPO))
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout


@pytest.mark.parametrize('augment_on', ['host', 'device'])
def test_resume_is_exact_across_processes(digits_dir, augment_on,
                                          fresh_process_hashes):
  """A restarted process (fresh TF runtime) gives the same batches (device
  path: the same raw images, labels and random draws)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  cfg = _cfg(digits_dir, randaug='405', mixup_alpha=0.2, cutmix=True,
             label_smoothing=0.1, shuffle_buffer=100, num_chunks=4,
             augment_on=augment_on)
  batches = _take(data.create_train_iterator(
      cfg, global_batch_size=32, seed=11, process_index=0,
      process_count=1), 5)[3:]
  h = hashlib.sha256()
  for b in batches:
    for k in sorted(b):
      h.update(b[k].tobytes())
  assert f'HASH {augment_on} {h.hexdigest()}' in fresh_process_hashes


# ---------------------------------------------------------------------------
# Errors.
def test_config_errors(digits_dir):
  with pytest.raises(ValueError, match='multiple of process_count'):
    data.create_train_iterator(_cfg(digits_dir), global_batch_size=10, seed=0,
                               process_count=4, process_index=0)
  with pytest.raises(ValueError, match='num_classes=1000 but digits has 10'):
    data.create_train_iterator(_cfg(digits_dir, num_classes=1000), global_batch_size=8,
                               seed=0, process_count=1, process_index=0)
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'"):
    data.num_examples(_cfg(digits_dir, name='no_such_dataset_xyz'), 'train')
  with pytest.raises(ValueError, match='dtype'):
    data.create_eval_iterator(_cfg(digits_dir, dtype='float16'), global_batch_size=8,
                              process_count=1, process_index=0)
  with pytest.raises(ValueError, match=r"Split 'valid' is not valid for digits.*'test'"):
    data.num_examples(_cfg(digits_dir), 'valid')
  assert data.num_classes(_cfg(digits_dir)) == 10


def test_split_arithmetic():
  pieces = [('train', 10, 20), ('validation', 0, 5)]
  assert splits.slice_pieces(pieces, 8, 13) == [('train', 18, 20), ('validation', 0, 3)]
  for n, count in [(10, 3), (300, 7), (5, 8)]:
    ranges = [splits.eval_host_range(n, p, count) for p in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    train = [splits.train_host_range(n, p, count) for p in range(count)]
    assert len({b - a for a, b in train}) == 1


def test_fused_xla_finalize_matches_reference_and_cache(digits_dir):
  """The XLA-fused mix+normalise equals plain TF ops; cache=True changes nothing."""
  cfg = _cfg(digits_dir, mixup_alpha=0.2, cutmix=True, label_smoothing=0.1)
  kw = dict(global_batch_size=16, seed=2, process_index=0, process_count=1)
  fused = _take(data.create_train_iterator(cfg, **kw), 2)
  plain = _take(data.create_train_iterator(_cfg(digits_dir, mixup_alpha=0.2, cutmix=True,
                                                label_smoothing=0.1, xla=False), **kw), 2)
  cached = _take(data.create_train_iterator(_cfg(digits_dir, mixup_alpha=0.2, cutmix=True,
                                                 label_smoothing=0.1, cache=True), **kw), 2)
  for f, p, c in zip(fused, plain, cached):
    np.testing.assert_allclose(f['images'], p['images'], atol=1e-5)
    np.testing.assert_allclose(f['labels'], p['labels'], atol=1e-6)
    _assert_batches_equal([f], [c])
