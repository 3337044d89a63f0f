"""The real tfds imagenet2012 builder path, on a tiny generated ILSVRC2012."""
import io
import logging as py_logging
import os
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from nfnets import config as config_lib
from nfnets import data
from nfnets.data import preprocess

SYNSETS = ('n01440764', 'n01443537', 'n01484850')  # first classes of labels.txt
PER_CLASS = 4
NUM_VAL = 6
LO, HI = preprocess.normalized_range()


def _jpeg(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      buf, format='JPEG', quality=90)
  return buf.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_fake_ilsvrc(manual_dir, seed=0):
  """ILSVRC2012_img_train.tar (per-synset tars) and ILSVRC2012_img_val.tar.

  The first training image of the first synset is not a JPEG (corrupt)."""
  rng = np.random.default_rng(seed)
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for s in SYNSETS:
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode='w') as inner:
        for i in range(PER_CLASS):
          payload = _jpeg(rng, int(rng.integers(24, 48)), int(rng.integers(24, 48)))
          if s == SYNSETS[0] and i == 0:
            payload = b'definitely not a JPEG ' * 4
          _add(inner, f'{s}_{i}.JPEG', payload)
      _add(outer, f'{s}.tar', buf.getvalue())
  # tfds assigns validation labels from its own list, in sorted file-name order.
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(NUM_VAL):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, 40, 30))


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('ilsvrc'))
  manual = os.path.join(root, 'manual')
  make_fake_ilsvrc(manual)
  builder = tfds.builder('imagenet2012', data_dir=root)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual, try_download_gcs=False))
  return root


def _cfg(data_dir, **kw):
  cfg = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  cfg.lock()
  cfg.update(dict(name='imagenet2012', data_dir=data_dir, train_split='train',
                  eval_split='validation', image_size=24, eval_image_size=28,
                  randaug='405', mixup_alpha=0.2, cutmix=True, label_smoothing=0.1,
                  shuffle_buffer=16, num_classes=1000, augment_on='host'))
  cfg.update(kw)
  return cfg


def test_missing_imagenet_error_text(tmp_path):
  cfg = _cfg(str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.create_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0,
                               process_count=1)
  assert isinstance(err.value, FileNotFoundError)
  msg = str(err.value)
  assert f'imagenet2012 is not prepared in {tmp_path}' in msg
  assert 'ILSVRC2012_img_train.tar' in msg and 'ILSVRC2012_img_val.tar' in msg
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in msg
  assert 'download_and_prepare()' in msg and 'tfds build imagenet2012' in msg
  assert 'configs/demo.py' in msg
  with pytest.raises(data.DatasetNotPreparedError):
    data.num_examples(cfg, 'validation')


def test_fake_ilsvrc_builds(imagenet_dir):
  cfg = _cfg(imagenet_dir)
  assert data.num_examples(cfg, 'train') == len(SYNSETS) * PER_CLASS
  assert data.num_examples(cfg, 'validation') == NUM_VAL
  assert data.num_examples(cfg, 'train[2:]') == len(SYNSETS) * PER_CLASS - 2


def test_imagenet_train_batches(imagenet_dir):
  cfg = _cfg(imagenet_dir, num_chunks=3)
  it = data.create_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                  process_count=1)
  batches = [next(it) for _ in range(5)]  # 40 raw reads: > 3 epochs of 12 (11 decodable)
  for b in batches:
    assert b['images'].shape == (4, 24, 24, 3) and b['images'].dtype == np.float32
    assert LO - 0.02 <= b['images'].min() and b['images'].max() <= HI + 0.02
    assert b['labels'].shape == (4, 1000)
    np.testing.assert_allclose(b['labels'].sum(-1), 1., rtol=1e-5)
    # Only the 3 synsets' classes carry more than the smoothing mass.
    assert set(np.nonzero(b['labels'].max(axis=0) > 0.0002)[0]) <= {0, 1, 2}
  # The corrupt JPEG is skipped (once per epoch), counted, not fatal.
  assert it.num_skipped >= 2


def test_imagenet_eval_covers_validation_and_skips_corrupt(imagenet_dir, caplog):
  cfg = _cfg(imagenet_dir)
  seen, labels = [], []
  for p in range(2):
    for b in data.create_eval_iterator(cfg, global_batch_size=4, process_index=p,
                                       process_count=2, with_ids=True):
      assert b['images'].shape == (2, 28, 28, 3)
      seen.extend(b['ids'][b['mask'] > 0].tolist())
      labels.extend(b['labels'][b['mask'] > 0].tolist())
  assert len(seen) == len(set(seen)) == NUM_VAL
  # Labels come from tfds' validation label list (not the padding default 0).
  assert len(set(labels)) > 1
  # Evaluating the train split: the corrupt image is dropped and logged.
  with caplog.at_level(py_logging.WARNING):
    it = data.create_eval_iterator(cfg, global_batch_size=4, process_index=0,
                                   process_count=1, split='train')
    batches = list(it)
  assert sum(b['mask'].sum() for b in batches) == len(SYNSETS) * PER_CLASS - 1
  assert len(batches) == 3
  assert it.num_skipped == 1 and len(it.skipped) == 1 and it.skipped[0].startswith('imagenet2012 train[')
  warnings = [r.getMessage() for r in caplog.records if 'undecodable' in r.getMessage()]
  assert len(warnings) == 1 and it.skipped[0] in warnings[0]
