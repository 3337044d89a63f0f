"""tf.data input pipelines: sources, per-host sharding, batching, prefetch.

Sources (data_config.name):
  * 'imagenet2012' - tfds imagenet2012 (JPEG bytes, decoded in the pipeline).
  * 'digits'       - the embedded sklearn digits, a tfds builder of our own
                     (nfnets.data.digits), prepared on first use.
  * 'fake'         - random images at any resolution, generated in the
                     pipeline (no I/O), for benchmarks and smoke tests.
All three go through the same sharding / shuffling / batching / mixing code.

Sharding. A split string (tfds syntax, e.g. 'train[10000:]',
'train[:10000]+validation') is resolved with tfds' own slicing rules into an
ordered virtual list of N examples. Train: process p reads the contiguous
range [p*n, (p+1)*n) with n = N // process_count (the < process_count
remainder is dropped so every host has the same epoch length; hosts are
disjoint). Eval: ranges of size N//P or N//P + 1 that cover all N; every host
yields the same number of batches, ceil(ceil(N/P) / per_host_batch), the last
ones padded with mask 0.

Train order, determinism and resumption (the guarantee):
  * A host's range is cut into K contiguous chunks (K = data_config.num_chunks
    or clip(n // 10000, 1, 64)). Epoch e reads the chunks in a random order
    that is a pure function of (seed, process, e), then shuffles with a
    buffer of data_config.shuffle_buffer examples seeded by (seed, process, e).
    (tfds shuffles examples when it writes a dataset, so chunks are random
    subsets.)
  * Every example at stream position g (examples consumed on this host since
    step 0, across epochs) is augmented with a stateless RNG keyed by
    (seed, process, g); MixUp/CutMix of batch t are keyed by (seed, process, t).
  * Hence the stream of batches is a deterministic function of (seed,
    dataset, host layout, batch size), and create_train_iterator(start_step=k)
    yields exactly the batches k, k+1, ... of an uninterrupted run (bit-exact
    on CPU; tested). It starts directly at epoch floor(k*B/n) and skips the
    first (k*B mod n) shuffled, *undecoded* records of that epoch, so resuming
    costs reading at most one epoch of raw records on each host (no decoding),
    and never replays examples of the epoch.
  * Exceptions: undecodable images are skipped (see below), which shifts the
    stream of a run that skipped some relative to a resumed one by the
    number skipped before the restart; and tf.random.set_seed() (the global
    seed) changes the shuffle order. Changing the host count or batch size
    changes the stream.

Corrupt / undecodable images: skipped, not fatal. Decoding runs in its own
stage followed by `ignore_errors`; the train iterator counts the gaps in the
example positions and logs 'Skipped N undecodable image(s)' (also available as
`iterator.num_skipped`); the eval iterator logs the count at the end and the
missing examples simply do not appear in 'mask' (padding takes their place).
Augmentation bugs are not swallowed: only the decode stage is guarded. An
all-undecodable train dataset would make the iterator spin without output.
"""
import collections
import dataclasses
import itertools
import math
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nfnets.data import digits as digits_lib
from nfnets.data import mix as mix_lib
from nfnets.data import preprocess
from nfnets.data import randaugment as ra_lib

AUTOTUNE = tf.data.AUTOTUNE

# The input pipeline runs on the host; keep TensorFlow off any accelerator
# (a GPU build of TF would otherwise reserve GPU memory that JAX needs).
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # Already initialised / no such device type.
  pass
_BIG = 2 ** 62
_DIGITS_PAD = 2
_FAKE_SPLITS = {'train': 1_281_167, 'validation': 50_000, 'test': 50_000}

Piece = Tuple[str, int, int]  # (split name, start, stop), absolute indices.


class DatasetNotPreparedError(FileNotFoundError):
  """The requested tfds dataset is not prepared in the data dir."""


def _imagenet_not_prepared_message(name: str, data_dir: str) -> str:
  manual = os.path.join(data_dir, 'downloads', 'manual')
  return (
      f'{name} is not prepared in {data_dir}.\n'
      'To prepare it (once; needs ~300 GB of disk and a few hours):\n'
      '  1. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
      '(register at https://image-net.org/download-images) and place them in\n'
      f'       {manual}\n'
      '  2. Run\n'
      f'       python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"\n"
      f'     or: tfds build {name} --data_dir {data_dir} --manual_dir {manual}\n'
      'Set data_config.data_dir (or TFDS_DATA_DIR) to use another directory.\n'
      'To run without ImageNet, try the demo config (configs/demo.py), which '
      "trains on the embedded 'digits' dataset (no download).")


# Our map functions are plain TF code; autograph conversion only costs time.
_no_autograph = tf.autograph.experimental.do_not_convert


def _get(cfg, key: str, default=None):
  try:
    value = cfg.get(key, default)
  except AttributeError:
    value = getattr(cfg, key, default)
  return default if value is None else value


# ---------------------------------------------------------------------------
# Split arithmetic.
@dataclasses.dataclass
class _SplitLen:
  num_examples: int

  @property
  def shard_lengths(self):
    return [self.num_examples]


def resolve_split(split_infos, split: str) -> List[Piece]:
  """tfds split string -> ordered list of absolute (name, start, stop) pieces."""
  ri = tfds.core.ReadInstruction.from_spec(split)
  pieces = []
  for instr in ri.to_absolute(split_infos):
    n = split_infos[instr.splitname].num_examples
    start = 0 if instr.from_ is None else instr.from_
    stop = n if instr.to is None else instr.to
    if stop > start:
      pieces.append((instr.splitname, start, stop))
  return pieces


def pieces_len(pieces: Sequence[Piece]) -> int:
  return sum(b - a for _, a, b in pieces)


def slice_pieces(pieces: Sequence[Piece], start: int, stop: int) -> List[Piece]:
  """The sub-pieces covering virtual positions [start, stop) of `pieces`."""
  out, offset = [], 0
  for name, a, b in pieces:
    n = b - a
    lo, hi = max(start - offset, 0), min(stop - offset, n)
    if hi > lo:
      out.append((name, a + lo, a + hi))
    offset += n
  return out


def train_host_range(n: int, process_index: int, process_count: int):
  per_host = n // process_count
  return process_index * per_host, (process_index + 1) * per_host


def eval_host_range(n: int, process_index: int, process_count: int):
  base, rem = divmod(n, process_count)
  start = process_index * base + min(process_index, rem)
  return start, start + base + (1 if process_index < rem else 0)


def _even_ranges(n: int, k: int):
  bounds = [(i * n) // k for i in range(k + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------------------
# Sources. read() yields dicts {'record', 'label' (int64), 'id' (int64)}.
class _Source:
  """Base class: a dataset of records plus its decoding functions."""
  name: str = ''
  num_classes: Optional[int] = None
  split_infos: Any = None

  def read(self, pieces: Sequence[Piece]) -> tf.data.Dataset:
    raise NotImplementedError

  # Stage 1 (may fail on corrupt data; guarded by ignore_errors).
  def decode_train(self, record, seed, image_size: int, cfg):
    raise NotImplementedError

  # Stage 2 (never swallowed): -> uint8 [S, S, 3].
  def augment_train(self, decoded, seed, image_size: int, cfg):
    raise NotImplementedError

  def decode_eval(self, record, image_size: int, cfg):
    raise NotImplementedError


class TfdsJpegSource(_Source):
  """ImageNet-style source: JPEG bytes, inception crop, flip."""

  def __init__(self, builder, name='imagenet2012'):
    self.builder = builder
    self.name = name
    self.split_infos = builder.info.splits
    self.num_classes = builder.info.features['label'].num_classes

  def read(self, pieces):
    split = '+'.join(f'{n}[{a}:{b}]' for n, a, b in pieces)
    ds = _tfds_read(self.builder, split)

    def fmt(ex):
      return {'record': ex['image'], 'label': tf.cast(ex['label'], tf.int64),
              'id': tf.strings.to_hash_bucket_fast(ex['file_name'], _BIG)}
    return ds.map(fmt, num_parallel_calls=AUTOTUNE, deterministic=True)

  def decode_train(self, record, seed, image_size, cfg):
    return preprocess.decode_and_inception_crop(record, seed, image_size)

  def augment_train(self, decoded, seed, image_size, cfg):
    return preprocess.train_image_from_crop(
        decoded, seed, image_size, _get(cfg, 'resize_method', 'bicubic'))

  def decode_eval(self, record, image_size, cfg):
    return preprocess.decode_eval_jpeg(
        record, image_size, _get(cfg, 'resize_method', 'bicubic'))


class InMemoryJpegSource(TfdsJpegSource):
  """JPEG strings held in memory, same decoding as imagenet2012 (benchmarks,
  corrupt-image tests). Single split 'train' (also served as 'validation')."""

  def __init__(self, jpegs: Sequence[bytes], labels: Sequence[int],
               num_classes: int = 1000):
    self.name = 'in_memory_jpeg'
    self.jpegs = list(jpegs)
    self.labels = np.asarray(labels, np.int64)
    n = len(self.jpegs)
    self.split_infos = {'train': _SplitLen(n), 'validation': _SplitLen(n)}
    self.num_classes = num_classes
    self._table = tf.constant(self.jpegs)

  def read(self, pieces):
    dss = []
    for _, a, b in pieces:
      ds = tf.data.Dataset.range(a, b).map(
          lambda i: {'record': tf.gather(self._table, i),
                     'label': tf.gather(tf.constant(self.labels), i),
                     'id': i})
      dss.append(ds)
    return _concat(dss)


class DigitsSource(_Source):
  """The embedded digits (32x32 PNG): pad-2 random crop, no flip (digits are
  not mirror-invariant), resized if image_size != 32."""

  def __init__(self, builder):
    self.builder = builder
    self.name = 'digits'
    self.split_infos = builder.info.splits
    self.num_classes = digits_lib.NUM_CLASSES

  def read(self, pieces):
    split = '+'.join(f'{n}[{a}:{b}]' for n, a, b in pieces)
    ds = _tfds_read(self.builder, split)
    return ds.map(lambda ex: {'record': ex['image'],
                              'label': tf.cast(ex['label'], tf.int64),
                              'id': tf.cast(ex['id'], tf.int64)},
                  num_parallel_calls=AUTOTUNE, deterministic=True)

  @staticmethod
  def _decode(record):
    image = tf.io.decode_png(record, channels=3)
    image.set_shape([digits_lib.IMAGE_SIZE, digits_lib.IMAGE_SIZE, 3])
    return image

  def decode_train(self, record, seed, image_size, cfg):
    return self._decode(record)

  def augment_train(self, decoded, seed, image_size, cfg):
    pad = int(_get(cfg, 'digits_pad', _DIGITS_PAD))
    image = preprocess.pad_and_random_crop(decoded, seed, pad) if pad else decoded
    if image_size != digits_lib.IMAGE_SIZE:
      image = preprocess.resize(image, image_size, _get(cfg, 'resize_method', 'bicubic'))
    return preprocess.to_uint8(image)

  def decode_eval(self, record, image_size, cfg):
    image = tf.cast(self._decode(record), tf.float32)
    if image_size != digits_lib.IMAGE_SIZE:
      image = preprocess.resize(image, image_size, _get(cfg, 'resize_method', 'bicubic'))
    return image


class FakeSource(_Source):
  """Random uint8 images generated from the example index (no I/O).

  Split sizes: data_config.fake_num_examples (dict) or ImageNet's."""

  def __init__(self, num_classes: int, sizes=None):
    self.name = 'fake'
    sizes = dict(_FAKE_SPLITS, **(sizes or {}))
    self.split_infos = {k: _SplitLen(int(v)) for k, v in sizes.items()}
    self._salt = {k: i for i, k in enumerate(sorted(sizes))}
    self.num_classes = num_classes

  def read(self, pieces):
    dss = []
    for name, a, b in pieces:
      salt = self._salt[name]
      dss.append(tf.data.Dataset.range(a, b).map(
          lambda i, salt=salt: self._example(salt, i)))
    return _concat(dss)

  def _example(self, salt, i):
    seed = tf.stack([tf.constant(salt, tf.int64), i])
    label = tf.random.stateless_uniform([], seed, 0, self.num_classes, dtype=tf.int64)
    return {'record': seed, 'label': label, 'id': i + salt * _BIG // 8}

  @staticmethod
  def _image(seed, image_size):
    return tf.random.stateless_uniform(
        [image_size, image_size, 3], seed, 0, 256, dtype=tf.int32)

  def decode_train(self, record, seed, image_size, cfg):
    return tf.cast(self._image(record, image_size), tf.uint8)

  def augment_train(self, decoded, seed, image_size, cfg):
    return tf.image.stateless_random_flip_left_right(decoded, seed)

  def decode_eval(self, record, image_size, cfg):
    return tf.cast(self._image(record, image_size), tf.float32)


def _concat(dss):
  if not dss:
    raise ValueError('Empty split.')
  ds = dss[0]
  for d in dss[1:]:
    ds = ds.concatenate(d)
  return ds


def _tfds_read(builder, split: str) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  read_config = tfds.ReadConfig(
      options=options, try_autocache=False, skip_prefetch=True,
      interleave_cycle_length=16, interleave_block_length=16)
  return builder.as_dataset(
      split=split, shuffle_files=False, read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()})


def get_source(data_config) -> _Source:
  """The source for data_config.name; raises DatasetNotPreparedError."""
  name = _get(data_config, 'name', 'digits')
  data_dir = _get(data_config, 'data_dir', None)
  if name == 'digits':
    return DigitsSource(digits_lib.prepare(data_dir))
  if name == 'fake':
    return FakeSource(int(_get(data_config, 'num_classes', 1000)),
                      _get(data_config, 'fake_num_examples', None))
  if name.startswith('imagenet2012'):
    tfds_name = _get(data_config, 'tfds_name', name)
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
          _imagenet_not_prepared_message(tfds_name, os.fspath(builder.data_dir_root)))
    return TfdsJpegSource(builder, name=tfds_name)
  raise ValueError(f"Unknown dataset {name!r}: one of 'imagenet2012', 'digits', 'fake'.")


def num_examples(data_config, split: str, *, source=None) -> int:
  """Number of examples of `split` (tfds split syntax) of data_config's dataset."""
  source = source or get_source(data_config)
  return pieces_len(resolve_split(source.split_infos, split))


# ---------------------------------------------------------------------------
# Layout.
@dataclasses.dataclass
class Layout:
  process_index: int
  process_count: int
  local_device_count: int
  per_host_batch: int
  per_device_batch: int


def get_layout(global_batch_size: int, process_index=None, process_count=None,
               local_device_count=None) -> Layout:
  if process_index is None or process_count is None or local_device_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local_device_count = (jax.local_device_count() if local_device_count is None
                          else local_device_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if global_batch_size % (process_count * local_device_count):
    raise ValueError(
        f'global_batch_size {global_batch_size} must be divisible by '
        f'process_count * local_device_count = {process_count} * {local_device_count}.')
  per_host = global_batch_size // process_count
  return Layout(process_index, process_count, local_device_count, per_host,
                per_host // local_device_count)


def _check_classes(source, data_config):
  num_classes = int(_get(data_config, 'num_classes', source.num_classes or 1000))
  if source.num_classes is not None and num_classes != source.num_classes:
    raise ValueError(f'data_config.num_classes={num_classes} but {source.name} '
                     f'has {source.num_classes} classes.')
  return num_classes


def _tf_dtype(data_config):
  dtype = str(_get(data_config, 'dtype', 'float32'))
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"data_config.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  return tf.bfloat16 if dtype == 'bfloat16' else tf.float32


def _options(num_threads: Optional[int]):
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  if num_threads:
    options.threading.private_threadpool_size = num_threads
    options.threading.max_intra_op_parallelism = 1
  return options


# ---------------------------------------------------------------------------
# Train.
def build_train_dataset(data_config, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index=None,
                        process_count=None, local_device_count=None,
                        source: Optional[_Source] = None, with_ids: bool = False,
                        num_threads: Optional[int] = None) -> tf.data.Dataset:
  """The train tf.data.Dataset (batches already in the pmap layout).

  Elements: {'images' [D, b, S, S, 3] dtype, 'labels' float32 [D, b, C],
  'pos' int64 [D, b] (stream positions; used to count skipped images),
  'ids' int64 [D, b] only if with_ids}.
  """
  layout = get_layout(global_batch_size, process_index, process_count,
                      local_device_count)
  source = source or get_source(data_config)
  num_classes = _check_classes(source, data_config)
  image_size = int(_get(data_config, 'image_size', 224))
  split = _get(data_config, 'train_split', 'train')
  pieces = resolve_split(source.split_infos, split)
  total = pieces_len(pieces)
  h_start, h_stop = train_host_range(total, layout.process_index, layout.process_count)
  n_host = h_stop - h_start
  if n_host <= 0:
    raise ValueError(f'Split {split!r} ({total} examples) is too small for '
                     f'{layout.process_count} processes.')
  num_chunks = int(_get(data_config, 'num_chunks', 0)) or int(np.clip(n_host // 10000, 1, 64))
  num_chunks = max(1, min(num_chunks, n_host))
  chunk_ranges = _even_ranges(n_host, num_chunks)
  cache = bool(_get(data_config, 'cache', False))
  chunks = []
  for a, b in chunk_ranges:
    ds = source.read(slice_pieces(pieces, h_start + a, h_start + b))
    chunks.append(ds.cache() if cache else ds)
  chunk_sizes = tf.constant([b - a for a, b in chunk_ranges], tf.int64)
  shuffle_buffer = int(min(int(_get(data_config, 'shuffle_buffer', 10_000)), n_host))

  seed = int(seed)
  key = tf.constant([seed, layout.process_index], tf.int64)
  # Independent keys for the epoch order, the examples and the batches.
  order_key, example_key, batch_key = [
      tf.random.experimental.stateless_split(key, 3)[i] for i in range(3)]
  shuffle_base = int(seed % (2 ** 31)) * 1_000_003 + layout.process_index * 7919

  @_no_autograph
  def epoch_dataset(epoch):
    epoch = tf.cast(epoch, tf.int64)
    if num_chunks > 1:
      perm = tf.random.experimental.stateless_shuffle(
          tf.range(num_chunks, dtype=tf.int64),
          seed=tf.random.experimental.stateless_fold_in(order_key, epoch))
      choice = tf.data.Dataset.from_tensor_slices(
          (perm, tf.gather(chunk_sizes, perm))).flat_map(
              lambda c, n: tf.data.Dataset.from_tensors(c).repeat(n))
      ds = tf.data.Dataset.choose_from_datasets(chunks, choice)
    else:
      ds = chunks[0]
    if shuffle_buffer > 1:
      ds = ds.shuffle(shuffle_buffer, seed=shuffle_base + epoch * 104_729,
                      reshuffle_each_iteration=False)
    return ds

  start_pos = int(start_step) * layout.per_host_batch
  first_epoch, offset = divmod(start_pos, n_host)
  ds = epoch_dataset(first_epoch).skip(offset).concatenate(
      tf.data.Dataset.range(first_epoch + 1, _BIG).flat_map(epoch_dataset))
  ds = ds.enumerate(start=start_pos)

  randaug = preprocess.parse_randaug(_get(data_config, 'randaug', None))
  ra_mode = _get(data_config, 'randaug_mode', 'release')
  smoothing = float(_get(data_config, 'label_smoothing', 0.0))

  @_no_autograph
  def decode(pos, ex):
    seed_ = tf.random.experimental.stateless_fold_in(example_key, pos)
    s_crop = preprocess.split_seed(seed_, 3)[0]
    decoded = source.decode_train(ex['record'], s_crop, image_size, data_config)
    return {'decoded': decoded, 'label': ex['label'], 'id': ex['id'], 'pos': pos}

  @_no_autograph
  def augment(ex):
    seed_ = tf.random.experimental.stateless_fold_in(example_key, ex['pos'])
    s_aug, s_ra = tf.unstack(preprocess.split_seed(seed_, 3)[1:])
    image = source.augment_train(ex['decoded'], s_aug, image_size, data_config)
    image = preprocess.to_uint8(image)
    if randaug:
      image = ra_lib.randaugment(image, s_ra, randaug[0], randaug[1], ra_mode)
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    label = preprocess.one_hot_smoothed(ex['label'], num_classes, smoothing)
    return {'images': image, 'labels': label, 'pos': ex['pos'], 'id': ex['id']}

  ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.map(augment, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(layout.per_host_batch, drop_remainder=True)
  ds = ds.enumerate(start=int(start_step))

  mixup_alpha = float(_get(data_config, 'mixup_alpha', 0.0))
  use_cutmix = bool(_get(data_config, 'cutmix', False))
  out_dtype = _tf_dtype(data_config)

  mixing = bool(mixup_alpha or use_cutmix)
  mix_and_normalize = _mix_and_normalize_fn(
      mixing, out_dtype, bool(_get(data_config, 'xla', True)))

  @_no_autograph
  def finalize(step, batch):
    images, labels = batch['images'], batch['labels']
    n = layout.per_host_batch
    if mixing:
      bseed = tf.random.experimental.stateless_fold_in(batch_key, step)
      params = mix_lib.sample_params(bseed, n, image_size, image_size,
                                     mixup_alpha, use_cutmix)
    else:
      params = {'lam': tf.ones([n]), 'box': tf.zeros([n, 4], tf.int32)}
    images, labels = mix_and_normalize(images, labels, params['lam'], params['box'])
    out = {'images': images, 'labels': labels, 'pos': batch['pos']}
    if with_ids:
      out['ids'] = batch['id']
    return out

  ds = ds.map(finalize, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.prefetch(AUTOTUNE)
  return ds.with_options(_options(num_threads))


def _mix_and_normalize_fn(mixing: bool, out_dtype, use_xla: bool):
  """uint8 batch -> mixed, normalised batch in out_dtype.

  With use_xla (data_config.xla, default True) the per-pixel work is one
  XLA-compiled function, i.e. a single fused pass over the batch: on CPU that
  is ~5x cheaper than the same TF ops run one by one, and it matters because
  this touches every pixel of every batch."""
  def fn(images, labels, lam, box):
    if mixing:
      images, labels = mix_lib.apply_params(images, labels, {'lam': lam, 'box': box})
    images = preprocess.normalize(images)
    return tf.cast(images, out_dtype), labels
  return tf.function(fn, jit_compile=True, autograph=False) if use_xla else fn


class TrainIterator:
  """Python iterator of numpy batches; counts skipped (undecodable) images."""

  def __init__(self, ds: tf.data.Dataset, start_pos: int):
    self._it = ds.as_numpy_iterator()
    self._start_pos = start_pos
    self._seen = 0
    self._max_pos = start_pos - 1
    self.num_skipped = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    pos = batch.pop('pos')
    self._seen += pos.size
    self._max_pos = max(self._max_pos, int(pos.max()))
    skipped = self._max_pos + 1 - self._start_pos - self._seen
    if skipped > self.num_skipped:
      self.num_skipped = skipped
      logging.warning('Skipped %d undecodable image(s) so far in the train '
                      'input pipeline.', skipped)
    return batch


def create_train_iterator(data_config, *, global_batch_size: int, seed: int,
                          start_step: int = 0, process_index=None,
                          process_count=None, local_device_count=None,
                          with_ids: bool = False, source=None,
                          num_threads: Optional[int] = None) -> TrainIterator:
  """Infinite iterator of train batches (numpy), see module doc for guarantees.

  Returns dicts {'images': [local_devices, per_device, S, S, 3] (normalised,
  data_config.dtype), 'labels': float32 [local_devices, per_device, classes]
  (one-hot, label-smoothed, MixUp/CutMix-mixed)}.
  """
  layout = get_layout(global_batch_size, process_index, process_count, local_device_count)
  ds = build_train_dataset(
      data_config, global_batch_size=global_batch_size, seed=seed,
      start_step=start_step, process_index=layout.process_index,
      process_count=layout.process_count,
      local_device_count=layout.local_device_count, source=source,
      with_ids=with_ids, num_threads=num_threads)
  return TrainIterator(ds, int(start_step) * layout.per_host_batch)


# ---------------------------------------------------------------------------
# Eval.
def create_eval_iterator(data_config, *, global_batch_size: int,
                         process_index=None, process_count=None,
                         local_device_count=None, with_ids: bool = False,
                         source=None, split: Optional[str] = None,
                         num_threads: Optional[int] = None):
  """Finite iterator over data_config.eval_split, each example once overall.

  Yields {'images' [D, b, S, S, 3], 'labels' int32 [D, b], 'mask' float32
  [D, b]} (+ 'ids' int64 if with_ids; -1 for padding). Every host yields
  ceil(ceil(N / process_count) / per_host_batch) batches.
  """
  layout = get_layout(global_batch_size, process_index, process_count, local_device_count)
  source = source or get_source(data_config)
  _check_classes(source, data_config)
  image_size = int(_get(data_config, 'eval_image_size', 0) or _get(data_config, 'image_size', 224))
  split = split or _get(data_config, 'eval_split', 'validation')
  pieces = resolve_split(source.split_infos, split)
  total = pieces_len(pieces)
  h_start, h_stop = eval_host_range(total, layout.process_index, layout.process_count)
  n_host = h_stop - h_start
  max_host = -(-total // layout.process_count)
  num_batches = -(-max_host // layout.per_host_batch)
  out_dtype = _tf_dtype(data_config)

  @_no_autograph
  def decode(ex):
    image = source.decode_eval(ex['record'], image_size, data_config)
    return {'image': image, 'label': ex['label'], 'id': ex['id']}

  @_no_autograph
  def finish(ex):
    image = tf.ensure_shape(preprocess.normalize(ex['image']), [image_size, image_size, 3])
    return {'images': image, 'labels': tf.cast(ex['label'], tf.int32),
            'mask': tf.constant(1., tf.float32), 'ids': ex['id']}

  pad = tf.data.Dataset.from_tensors({
      'images': tf.zeros([image_size, image_size, 3], tf.float32),
      'labels': tf.constant(0, tf.int32), 'mask': tf.constant(0., tf.float32),
      'ids': tf.constant(-1, tf.int64)}).repeat()
  if n_host > 0:
    ds = source.read(slice_pieces(pieces, h_start, h_stop))
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.concatenate(pad)
  else:
    ds = pad
  ds = ds.take(num_batches * layout.per_host_batch)
  ds = ds.batch(layout.per_host_batch, drop_remainder=True)

  @_no_autograph
  def reshape(batch):
    out = {'images': tf.cast(batch['images'], out_dtype),
           'labels': batch['labels'], 'mask': batch['mask']}
    if with_ids:
      out['ids'] = batch['ids']
    return out

  ds = ds.map(reshape, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.prefetch(AUTOTUNE).with_options(_options(num_threads))
  return _EvalIterator(ds, n_host, split, num_batches)


class _EvalIterator:
  """Finite numpy iterator; logs undecodable images at the end."""

  def __init__(self, ds, n_host: int, split: str, num_batches: int):
    self._ds = ds
    self._n_host = n_host
    self._split = split
    self.num_batches = num_batches

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    real = 0
    for batch in self._ds.as_numpy_iterator():
      real += int(batch['mask'].sum())
      yield batch
    if real < self._n_host:
      logging.warning('Eval split %s: skipped %d undecodable image(s) of %d on '
                      'this host.', self._split, self._n_host - real, self._n_host)
