"""Any tfds builder (JPEG, PNG, grey, decoded) and the image-folder source.

The tfds builders are tiny GeneratorBasedBuilders defined here and prepared
into a temp dir (no download): the real tfds read path, unlike
tfds.testing.mock_data, which has no split sizes offline.
"""
import io
import logging as py_logging
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nfnets import config as config_lib
from nfnets import data
from nfnets.errors import DataError
from nfnets.data import folder as folder_lib
from nfnets.data import preprocess
import test_images

NUM_TRAIN, NUM_TEST = 12, 5


def data_config(**kw) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  cfg.num_classes = None
  cfg.lock()
  cfg.update(dict(dict(image_size=24, eval_image_size=24, randaug='', label_smoothing=0.0,
                       shuffle_buffer=16, augment_on='host'), **kw))
  return cfg


def _examples(split):
  rng = np.random.default_rng(0 if split == 'train' else 1)
  for i in range(NUM_TRAIN if split == 'train' else NUM_TEST):
    h, w = int(rng.integers(30, 50)), int(rng.integers(30, 50))
    yield i, test_images.photo(rng, h, w), int(rng.integers(0, 3))


class NfnetsTestMulti(tfds.core.GeneratorBasedBuilder):
  """A JPEG and a PNG image feature of the same picture, two ClassLabels."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'image_png': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
        'label': tfds.features.ClassLabel(num_classes=3),
        'coarse': tfds.features.ClassLabel(num_classes=2),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    for i, pic, label in _examples(split):
      yield i, {'image': io.BytesIO(test_images.encode(pic, 'JPEG', quality=98)),
                'image_png': io.BytesIO(test_images.encode(pic, 'PNG')),
                'label': label, 'coarse': label % 2}


class NfnetsTestGrey(tfds.core.GeneratorBasedBuilder):
  """One grey PNG image feature (encoding_format None), label 'category'."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'picture': tfds.features.Image(shape=(None, None, 1)),
        'category': tfds.features.ClassLabel(names=['a', 'b', 'c', 'd']),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    for i, pic, label in _examples(split):
      yield i, {'picture': io.BytesIO(test_images.encode(pic[..., 0], 'PNG')), 'category': label}


class NfnetsTestDecoded(tfds.core.GeneratorBasedBuilder):
  """Images stored decoded (a uint8 [H, W, 3] tensor feature)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'pixels': tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        'label': tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(s) for s in ('train', 'test')}

  def _generate_examples(self, split):
    rng = np.random.default_rng(2)
    for i, _, label in _examples(split):
      yield i, {'pixels': test_images.photo(rng, 32, 32), 'label': label}


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  for cls in (NfnetsTestMulti, NfnetsTestGrey, NfnetsTestDecoded):
    cls(data_dir=d).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return d


def _host(it, n):
  return [next(it) for _ in range(n)]


def _eval(cfg, count=1, split=None):
  batches, iters = [], []
  for p in range(count):
    it = data.create_eval_iterator(cfg, global_batch_size=4 * count, process_index=p,
                                   process_count=count, with_ids=True, split=split)
    batches.extend(list(it))
    iters.append(it)
  return batches, iters


# ---------------------------------------------------------------------------
# tfds builders.
def test_tfds_jpeg_and_png_take_the_same_path(tfds_dir):
  kw = dict(name='nfnets_test_multi', data_dir=tfds_dir, eval_split='test')
  jpeg_cfg = data_config(image_key='image', **kw)
  png_cfg = data_config(image_key='image_png', **kw)
  assert data.num_classes(jpeg_cfg) == 3
  assert data.num_examples(png_cfg, 'train[:50%]+test') == NUM_TRAIN // 2 + NUM_TEST
  truth = {i: label for i, _, label in _examples('test')}
  evals = {}
  for cfg in (jpeg_cfg, png_cfg):
    batches, _ = _eval(cfg, count=2)
    real = np.concatenate([b['mask'] for b in batches]) > 0
    assert real.sum() == NUM_TEST
    assert len(set(np.concatenate([b['ids'] for b in batches])[real].tolist())) == NUM_TEST
    assert sorted(np.concatenate([b['labels'] for b in batches])[real].tolist()) == sorted(truth.values())
    evals[cfg.image_key] = np.concatenate([b['images'] for b in batches])[real]
  # The same pictures, JPEG (q98) vs PNG: the same resize-crop, near-equal pixels.
  assert np.abs(evals['image'] - evals['image_png']).mean() < 0.05
  # Train (no mixing): the same seeds give the same crops and flips.
  trains = {}
  for cfg in (jpeg_cfg, png_cfg):
    cfg = data_config(**dict(kw, image_key=cfg.image_key, mixup_alpha=0.0, cutmix=False))
    it = data.create_train_iterator(cfg, global_batch_size=4, seed=2, process_index=0,
                                    process_count=1, with_ids=True)
    trains[cfg.image_key] = _host(it, 3)
  for a, b in zip(trains['image'], trains['image_png']):
    np.testing.assert_array_equal(a['ids'], b['ids'])
    assert a['images'].shape == (4, 24, 24, 3)
    assert np.abs(a['images'] - b['images']).mean() < 0.05
  # With mixing and RandAugment (the default recipe).
  it = data.create_train_iterator(data_config(**dict(kw, image_key='image_png', randaug='405')),
                                  global_batch_size=4, seed=0, process_index=0,
                                  process_count=1)
  batch = next(it)
  assert batch['images'].shape == (4, 24, 24, 3) and batch['labels'].shape == (4, 3)


def test_tfds_feature_selection(tfds_dir):
  kw = dict(name='nfnets_test_multi', data_dir=tfds_dir)
  with pytest.raises(ValueError, match=r"several image features \['image', 'image_png'\].*image_key"):
    data.get_source(data_config(**kw))
  with pytest.raises(ValueError, match="'coarse' is not an image"):
    data.get_source(data_config(image_key='coarse', **kw))
  with pytest.raises(ValueError, match=r"label_key='image' is not a ClassLabel.*\['label', 'coarse'\]"):
    data.get_source(data_config(image_key='image', label_key='image', **kw))
  source = data.get_source(data_config(image_key='image', **kw))
  assert (source.image_key, source.label_key, source.num_classes) == ('image', 'label', 3)
  assert data.num_classes(data_config(image_key='image', label_key='coarse', **kw)) == 2
  with pytest.raises(ValueError, match='num_classes=5 but nfnets_test_multi has 3'):
    data.create_eval_iterator(data_config(image_key='image', num_classes=5, **kw),
                              global_batch_size=4, process_index=0, process_count=1)


def test_tfds_grey_and_decoded_images(tfds_dir):
  grey = data_config(name='nfnets_test_grey', data_dir=tfds_dir, eval_split='test')
  assert data.num_classes(grey) == 4  # the only ClassLabel, 'category'
  batch = next(data.create_train_iterator(
      data_config(name='nfnets_test_grey', data_dir=tfds_dir, mixup_alpha=0., cutmix=False),
      global_batch_size=4, seed=0, process_index=0, process_count=1))
  pixels = batch['images'] * np.asarray(preprocess.STDDEV_RGB) + np.asarray(preprocess.MEAN_RGB)
  assert batch['images'].shape == (4, 24, 24, 3)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-3)  # grey -> RGB
  batches, _ = _eval(grey)
  assert sum(b['mask'].sum() for b in batches) == NUM_TEST
  decoded = data_config(name='nfnets_test_decoded', data_dir=tfds_dir, eval_split='test')
  assert not data.get_source(decoded).encoded
  batch = next(data.create_train_iterator(decoded, global_batch_size=4, seed=0,
                                          process_index=0, process_count=1))
  assert batch['images'].shape == (4, 24, 24, 3) and np.isfinite(batch['images']).all()
  batches, _ = _eval(decoded)
  assert sum(b['mask'].sum() for b in batches) == NUM_TEST


def test_tfds_not_prepared_and_unknown(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as err:
    data.get_source(data_config(name='nfnets_test_multi', data_dir=str(tmp_path)))
  msg = str(err.value)
  assert f"'nfnets_test_multi' is not prepared in {tmp_path}" in msg
  assert f'tfds build nfnets_test_multi --data_dir {tmp_path}' in msg
  assert 'download_and_prepare()' in msg
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_builder_xyz'.*'folder'"):
    data.get_source(data_config(name='no_such_builder_xyz', data_dir=str(tmp_path)))


# ---------------------------------------------------------------------------
# Image folder.
@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('folder'))
  test_images.write_folder(root)
  return root


def test_folder_splits_and_classes(image_folder):
  cfg = data_config(name='folder', data_dir=image_folder, eval_split='val')
  source = data.get_source(cfg)
  assert source.classes == list(test_images.CLASSES) and data.num_classes(cfg) == 3
  assert data.num_examples(cfg, 'train') == 16 and data.num_examples(cfg, 'val') == 10
  assert data.num_examples(cfg, 'validation') == 10
  assert data.num_examples(cfg, 'train[:50%]+val') == 18
  # Sorted relative paths; labels from the class folder.
  paths = [source.path('train', i) for i in range(16)]
  assert paths == sorted(paths)
  assert os.path.basename(os.path.dirname(paths[0])) == 'cat'
  with pytest.raises(ValueError, match=f"Split 'test' is not valid for folder {image_folder}"):
    data.num_examples(cfg, 'test')


def test_folder_eval_counts_each_decodable_image_once(image_folder, caplog):
  cfg = data_config(name='folder', data_dir=image_folder, eval_split='val', dtype='bfloat16')
  source = data.get_source(cfg)
  expect = {}
  for i in range(10):
    path = source.path('val', i)
    if 'broken' not in path:
      expect[folder_lib._path_id(os.path.relpath(path, image_folder))] = test_images.CLASSES.index(
          os.path.basename(os.path.dirname(path)))
  with caplog.at_level(py_logging.WARNING):
    batches, iters = _eval(cfg, count=2)
  ids = np.concatenate([b['ids'] for b in batches])
  labels = np.concatenate([b['labels'] for b in batches])
  real = np.concatenate([b['mask'] for b in batches]) > 0
  assert sorted(ids[real].tolist()) == sorted(expect)  # every decodable image once
  assert {int(i): int(l) for i, l in zip(ids[real], labels[real])} == expect
  assert batches[0]['images'].shape == (4, 24, 24, 3)
  broken = os.path.join(image_folder, 'val', 'cat', 'broken.png')
  assert sum(it.num_skipped for it in iters) == 1
  assert [p for it in iters for p in it.skipped] == [broken]
  warnings = [r.getMessage() for r in caplog.records if 'undecodable' in r.getMessage()]
  assert len(warnings) == 1 and broken in warnings[0]
  # Evaluating again (EMA weights, the next eval step) reads the split again:
  # the same skip is not warned about twice.
  caplog.clear()
  with caplog.at_level(py_logging.WARNING):
    for it in iters:
      list(it)
  assert sum(it.num_skipped for it in iters) == 1
  assert not [r for r in caplog.records if 'undecodable' in r.getMessage()]


def test_folder_train_batches_and_resume(image_folder, caplog):
  cfg = data_config(name='folder', data_dir=image_folder, randaug='405',
                    mixup_alpha=0.2, cutmix=True)
  kw = dict(global_batch_size=4, seed=0, process_index=0, process_count=1, with_ids=True)
  it = data.create_train_iterator(cfg, **kw)
  with caplog.at_level(py_logging.WARNING):
    batches = _host(it, 5)  # 40 raw reads > 2 epochs of 16 (15 decodable)
  warnings = [r for r in caplog.records
              if r.levelno >= py_logging.WARNING and 'undecodable' in r.getMessage()]
  broken = os.path.join(image_folder, 'train', 'dog', 'broken.jpg')
  assert len(warnings) == 1 and broken in warnings[0].getMessage()  # later skips counted
  assert warnings[0].getMessage().count(broken) == 1  # each file named once
  assert it.skipped and set(it.skipped) == {broken}
  for b in batches:
    assert b['images'].shape == (4, 24, 24, 3) and b['labels'].shape == (4, 3)
    np.testing.assert_allclose(b['labels'].sum(-1), 1., rtol=1e-5)
    assert np.all(b['ids'] != b['partner_ids'])
  assert it.num_skipped >= 2  # broken.jpg, once per epoch
  plain = data_config(name='folder', data_dir=image_folder, mixup_alpha=0., cutmix=False)
  fresh = _host(data.create_train_iterator(plain, **kw), 3)
  resumed = _host(data.create_train_iterator(plain, start_step=1, **kw), 2)
  for x, y in zip(fresh[1:], resumed):
    np.testing.assert_array_equal(x['images'], y['images'])
    np.testing.assert_array_equal(x['ids'], y['ids'])


def test_folder_errors(tmp_path):
  root = str(tmp_path / 'ds')
  test_images.write_folder(root)
  os.rename(os.path.join(root, 'val', 'zebra'), os.path.join(root, 'val', 'horse'))
  with pytest.raises(ValueError, match=rf"{root}: the class folders of val/ differ.*"
                                       r"\['zebra'\].*\['horse'\]"):
    data.get_source(data_config(name='folder', data_dir=root))
  os.rename(os.path.join(root, 'val', 'horse'), os.path.join(root, 'val', 'zebra'))
  empty = os.path.join(root, 'train', 'dog')
  for f in os.listdir(empty):
    os.remove(os.path.join(empty, f))
  with pytest.raises(ValueError, match=f'Class folder {empty} holds no images'):
    data.get_source(data_config(name='folder', data_dir=root))
  with pytest.raises(ValueError, match=f'{tmp_path} has no train/'):
    data.get_source(data_config(name='folder', data_dir=str(tmp_path)))
  os.makedirs(tmp_path / 'flat' / 'train')
  with pytest.raises(ValueError, match='has no class folders'):
    data.get_source(data_config(name='folder', data_dir=str(tmp_path / 'flat')))
  with pytest.raises(ValueError, match='needs config.data.data_dir'):
    data.get_source(data_config(name='folder'))


# ---------------------------------------------------------------------------
# Splits follow the dataset.
def _demo_on(**data_fields):
  c = config_lib.base_config()
  config_lib.use_demo_model(c)
  config_lib.use_digits(c)
  c.data.update(data_fields)
  return c


def test_splits_follow_the_dataset(image_folder, tfds_dir, tmp_path):
  from nfnets.training import setup  # pylint: disable=g-import-not-at-top
  cases = [(dict(name='digits', data_dir=str(tmp_path / 'digits')), ('train', 'test'), (1497, 300)),
           (dict(name='folder', data_dir=image_folder), ('train', 'val'), (16, 10)),
           (dict(name='nfnets_test_multi', data_dir=tfds_dir, image_key='image'), ('train', 'test'),
            (NUM_TRAIN, NUM_TEST)),
           (dict(name='fake', fake_train_examples=64, fake_eval_examples=32),
            ('train', 'validation'), (64, 32))]
  for fields, splits, sizes in cases:
    prepared = setup.prepare(_demo_on(**fields))
    got = (prepared.config.data.train_split, prepared.config.data.eval_split)
    assert got == splits, (fields['name'], got)
    assert (prepared.num_train_examples, prepared.num_eval_examples) == sizes
  # A value that is set wins.
  prepared = setup.prepare(_demo_on(name='folder', data_dir=image_folder,
                                    eval_split='train[:25%]'))
  assert prepared.config.data.eval_split == 'train[:25%]'
  assert prepared.config.data.train_split == 'train' and prepared.num_eval_examples == 4


def test_a_train_only_dataset_says_how_to_hold_out(tmp_path):
  from nfnets.training import setup  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'ds')
  test_images.write_folder(root)
  os.rename(os.path.join(root, 'val'), os.path.join(root, 'unused'))
  with pytest.raises(DataError,
                     match=r"only a train split: set config.data.train_split='train\[:90%\]' "
                           r"and config.data.eval_split='train\[90%:\]'"):
    setup.prepare(_demo_on(name='folder', data_dir=root))
  prepared = setup.prepare(_demo_on(name='folder', data_dir=root,
                                    train_split='train[:75%]', eval_split='train[75%:]'))
  assert (prepared.num_train_examples, prepared.num_eval_examples) == (12, 4)
  with pytest.raises(ValueError, match="config.data.eval_split: Split 'val' is not valid"):
    setup.prepare(_demo_on(name='folder', data_dir=root, eval_split='val'))
