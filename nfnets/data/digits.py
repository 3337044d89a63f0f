"""The embedded default dataset: scikit-learn's handwritten digits as a tfds builder.

`sklearn.datasets.load_digits()` ships with scikit-learn (no download): 1,797
grey 8x8 images, pixel values 0..16, 10 classes. This builder (tfds name
'nfnets_digits', selected with data_config.name = 'digits') stores them as
32x32 RGB uint8 PNGs:
  * values scaled 0..16 -> 0..255 (round(v * 255 / 16)),
  * upscaled 8 -> 32 px with bilinear interpolation (half-pixel centres,
    edge-clamped; plain numpy so the stored bytes do not depend on TF),
  * the grey channel repeated to 3 channels.
Fixed split: numpy's legacy `RandomState(0).permutation(1797)` (frozen by
numpy's stream-compatibility policy); its first 300 indices are 'test', the
other 1,497 'train'. Each example keeps its sklearn index as 'id'.

Prepared on first use into the tfds data dir (`prepare(data_dir)`), with no
network access.
"""
import io

import numpy as np
import tensorflow_datasets as tfds

NAME = 'nfnets_digits'
IMAGE_SIZE = 32
NUM_CLASSES = 10
NUM_TEST = 300
SPLIT_SEED = 0
NUM_EXAMPLES = {'train': 1497, 'test': NUM_TEST}


def _bilinear_upscale(images: np.ndarray, size: int) -> np.ndarray:
  """[N, h, w] float -> [N, size, size] float (half-pixel centres, clamped)."""
  n, h, w = images.shape

  def coords(in_len):
    c = (np.arange(size) + 0.5) * (in_len / size) - 0.5
    c = np.clip(c, 0, in_len - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, in_len - 1)
    return lo, hi, c - lo

  y0, y1, wy = coords(h)
  x0, x1, wx = coords(w)
  top = images[:, y0][:, :, x0] * (1 - wx) + images[:, y0][:, :, x1] * wx
  bot = images[:, y1][:, :, x0] * (1 - wx) + images[:, y1][:, :, x1] * wx
  del n
  return top * (1 - wy)[None, :, None] + bot * wy[None, :, None]


def load_arrays():
  """Returns dict split -> (images uint8 [N, 32, 32, 3], labels int64 [N], ids [N])."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  raw = digits.images.astype(np.float64) * (255. / 16.)          # [1797, 8, 8]
  big = _bilinear_upscale(raw, IMAGE_SIZE)
  big = np.clip(np.round(big), 0, 255).astype(np.uint8)
  rgb = np.repeat(big[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  perm = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
  out = {}
  for split, idx in (('test', perm[:NUM_TEST]), ('train', perm[NUM_TEST:])):
    idx = np.sort(idx)
    out[split] = (rgb[idx], labels[idx], idx.astype(np.int64))
  return out


class NfnetsDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn handwritten digits, 32x32 RGB, fixed train/test split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release (nfnets embedded dataset).'}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            'id': tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    arrays = load_arrays()
    return {split: self._generate_examples(*arrays[split]) for split in arrays}

  def _generate_examples(self, images, labels, ids):
    for image, label, i in zip(images, labels, ids):
      yield int(i), {'image': _png(image), 'label': int(label), 'id': int(i)}


def _png(image: np.ndarray) -> bytes:
  # PNG is lossless: the decoded pixels are exactly `image` (encoding with PIL
  # avoids tfds' TF-session encoder, which is slow to start).
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(image, mode='RGB').save(buf, format='PNG')
  return buf.getvalue()


def prepare(data_dir=None) -> tfds.core.DatasetBuilder:
  """Returns the digits builder, preparing it into `data_dir` if needed."""
  builder = NfnetsDigits(data_dir=data_dir)
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
      builder.download_and_prepare(download_config=config)
    except Exception:  # pylint: disable=broad-except
      # Another process may have prepared it concurrently.
      builder = NfnetsDigits(data_dir=data_dir)
      if not builder.is_prepared():
        raise
    builder = NfnetsDigits(data_dir=data_dir)
  return builder
