"""tf.data assembly of train and eval batches, the same for every source.

The sources (nfnets/data/sources.py, nfnets/data/folder.py) say what the
examples are and how one image is decoded; this module does everything else,
identically for all of them: per-host sharding, chunked epoch order,
shuffling, per-example augmentation, MixUp/CutMix, RandAugment, batching and
eval padding. It emits plain HOST batches (leading axis = this host's batch);
device placement and layout belong to nfnets/training.

Sharding. A split string (tfds syntax, e.g. 'train[10000:]',
'train[:10000]+validation') is resolved with tfds' own slicing rules into an
ordered virtual list of N examples (nfnets/data/splits.py). Train: process p
reads the contiguous range [p*n, (p+1)*n) with n = N // process_count (the
< process_count remainder is dropped so every host has the same epoch length;
hosts are disjoint). Eval: ranges of size N//P or N//P + 1 that cover all N;
every host yields the same number of batches, ceil(ceil(N/P) / per_host_batch),
the last ones padded with mask 0.

Where the augmentation runs (config.data.augment_on): 'device' (default)
ships raw uint8 images + the random draws and leaves MixUp/CutMix, RandAugment,
label smoothing and normalisation to nfnets/data/device_augment.py (JAX, in
the train step); 'host' does them here. The draws, their keys and the maths
are the same, so both give the same batches (up to float rounding). The
stages are in nfnets/data/train_stages.py.

Train batches, as in the NFNet release (deepmind-research/nfnets/dataset.py):
  * Each output example mixes two raw examples (mix.py): with MixUp and/or
    CutMix on, a step reads 2 * per_host_batch raw examples, each used once;
    without mixing, per_host_batch.
  * RandAugment runs on the MIXED image (config.data.augment_before_mix =
    False, the release's setting): the mixed float image is clipped to
    0..255 and cast to uint8 (truncation, as the release), RandAugmented,
    then normalised. augment_before_mix = True RandAugments each raw image
    before mixing instead. Without mixing, RandAugment runs on each image.
  * Shuffle buffer: config.data.shuffle_buffer examples, None = 10 x the
    per-host batch (the release's 10 * batch).

Train order, determinism and resumption (the guarantee):
  * A host's range is cut into K contiguous chunks (K = data_config.num_chunks
    or clip(n // 10000, 1, 64)). Epoch e reads the chunks in a random order
    that is a pure function of (seed, process, e), then shuffles with a
    seeded buffer. (tfds shuffles examples when it writes a dataset, so chunks
    are random subsets.)
  * Every raw example at stream position g (raw examples consumed on this host
    since step 0, across epochs; a step consumes 2 * per_host_batch of them
    with mixing) is augmented with a stateless RNG keyed by (seed, process, g);
    the mixing of step t by (seed, process, t); the post-mix RandAugment of
    output o (= t * per_host_batch + row) by (seed, process, o).
  * Hence the batches are a deterministic function of (seed, dataset, host
    layout, batch size), and create_train_iterator(start_step=k) yields
    exactly the batches k, k+1, ... of an uninterrupted run (bit-exact on CPU;
    tested). It starts directly at the right epoch and skips the already
    consumed shuffled, *undecoded* records of that epoch, so resuming costs
    reading at most one epoch of raw records per host (no decoding).
  * Exceptions: undecodable images are skipped (see below), which shifts the
    stream of a run that skipped some relative to a resumed one by the
    number skipped before the restart; and tf.random.set_seed() (the global
    seed) changes the shuffle order. Changing the host count or batch size
    changes the stream.

Corrupt / undecodable images: skipped, not fatal. Decoding (and, for an
image folder, reading the file) runs in its own stage followed by
`ignore_errors`. The train iterator finds the gaps in the stream positions:
`num_skipped`, and `skipped` naming the first few (replayed from the
undecoded stream, for sources whose records are cheap to re-read: an image
folder's paths; not tfds); one warning when the first is found. The eval
iterator knows which examples of its range never arrived: `num_skipped` and
`skipped` (names: file paths for an image folder, 'split[index]' otherwise)
after a full pass, and one warning naming the first few; the missing examples
do not appear in 'mask' (padding takes their place). Augmentation bugs are
not swallowed: only the decode stage is guarded. An all-undecodable train
dataset would make the iterator spin without output.
"""
import dataclasses
from typing import List, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from nfnets.data import preprocess
from nfnets.data import sources as sources_lib
from nfnets.data import splits as splits_lib
from nfnets.data import train_stages as stages
from nfnets.data.sources import get_source
from nfnets.data.splits import (eval_host_range, pieces_len, resolve_split,
                                slice_pieces)

AUTOTUNE = tf.data.AUTOTUNE
_no_autograph = sources_lib.no_autograph


# ---------------------------------------------------------------------------
# Layout and checks.
@dataclasses.dataclass
class Layout:
  process_index: int
  process_count: int
  per_host_batch: int


def get_layout(global_batch_size: int, process_index=None, process_count=None) -> Layout:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} must be a positive '
                     f'multiple of process_count = {process_count}.')
  return Layout(process_index, process_count, global_batch_size // process_count)


def _check_classes(source, data_config) -> int:
  num = data_config.num_classes
  if num is None:
    return int(source.num_classes)
  if source.num_classes is not None and int(num) != source.num_classes:
    raise ValueError(f'config.data.num_classes={num} but {source.name} has '
                     f'{source.num_classes} classes (leave model.num_classes None '
                     "to use the dataset's).")
  return int(num)


def _image_size(data_config, key: str) -> int:
  size = data_config[key]
  if key == 'eval_image_size' and size is None:
    size = data_config.image_size
  if size is None:
    raise ValueError(f'config.data.{key} is None: resolve the config '
                     '(nfnets.config.resolve) or set it.')
  return int(size)


def _tf_dtype(data_config):
  dtype = str(data_config.dtype)
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.data.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
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
                        process_count=None, source=None, with_ids: bool = False,
                        num_threads: Optional[int] = None) -> tf.data.Dataset:
  """The train tf.data.Dataset of host batches.

  Elements with augment_on='host': {'images' [B, S, S, 3] dtype, 'labels'
  float32 [B, C], 'pos' int64 [B, k] (stream positions of the k = 2 (mixing)
  or 1 raw examples of each output; used to count skipped images), and with_ids
  'ids' int64 [B] (+ 'partner_ids' [B] when mixing)}; B = per-host batch.
  With augment_on='device': the device batch of nfnets/data/device_augment.py
  (uint8 raw images [B, k, S, S, 3], int labels [B, k], the draws) + 'pos'.
  """
  return _build_train(data_config, global_batch_size=global_batch_size, seed=seed,
                      start_step=start_step, process_index=process_index,
                      process_count=process_count, source=source,
                      with_ids=with_ids, num_threads=num_threads)[0]


def _build_train(data_config, *, global_batch_size, seed, start_step, process_index,
                 process_count, source, with_ids, num_threads):
  """(train dataset, name_positions: stream positions -> example names)."""
  layout = get_layout(global_batch_size, process_index, process_count)
  source = source or get_source(data_config)
  plan = stages.train_plan(data_config, layout, source,
                           num_classes=_check_classes(source, data_config),
                           image_size=_image_size(data_config, 'image_size'),
                           out_dtype=_tf_dtype(data_config))
  keys = stages.stream_keys(seed, layout.process_index)
  stream = stages.EpochStream(source, data_config, plan, int(seed), keys['order'])
  ds = stream.from_position(int(start_step) * plan.raw_b)
  ds = stages.raw_examples(ds, plan, source, data_config, keys['example'])
  ds = ds.batch(plan.raw_b, drop_remainder=True)
  ds = ds.enumerate(start=int(start_step))
  if plan.on_device:
    ds = stages.device_batches(ds, plan, keys, with_ids)
  else:
    ds = stages.host_batches(ds, plan, keys, with_ids)
  ds = ds.prefetch(AUTOTUNE)
  return ds.with_options(_options(num_threads)), stream.names


class TrainIterator:
  """Python iterator of numpy host batches; counts skipped (undecodable) images.

  `num_skipped` counts the raw examples that could not be decoded so far;
  `skipped` names the first few (file paths for an image folder; empty for
  tfds sources, whose records are too costly to replay). One warning is
  logged when the first skip is found, later counts at INFO level.
  """
  _MAX_NAMED = 5

  def __init__(self, ds: tf.data.Dataset, start_pos: int, name: str = '',
               name_positions=None):
    self._it = ds.as_numpy_iterator()
    self._next_pos = start_pos  # every position below is accounted for
    self._name = name
    self._name_positions = name_positions
    self._missing: List[int] = []
    self.num_skipped = 0
    self.skipped: List[str] = []

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    # Positions grow from batch to batch (the stream order is kept), so the
    # gaps below this batch's largest position are the skipped examples.
    pos = np.unique(batch.pop('pos'))
    gaps = np.setdiff1d(np.arange(self._next_pos, pos[-1] + 1), pos)
    self._next_pos = int(pos[-1]) + 1
    if not gaps.size:
      return batch
    first = not self.num_skipped
    self.num_skipped += int(gaps.size)
    if len(self._missing) < self._MAX_NAMED:
      self._missing.extend(gaps[:self._MAX_NAMED - len(self._missing)].tolist())
      if self._name_positions is not None:
        self.skipped = self._name_positions(self._missing)
    if first:
      # A small dataset meets the same bad file once per epoch: name each once.
      names = list(dict.fromkeys(self.skipped))
      logging.warning(
          'Train input %s: skipped %d undecodable image(s)%s (later skips are '
          'counted in the iterator\'s num_skipped and logged at INFO level).',
          self._name, self.num_skipped,
          (': ' + ', '.join(names)) if names else '')
    else:
      logging.info('Train input %s: skipped %d undecodable image(s) so far.',
                   self._name, self.num_skipped)
    return batch


def create_train_iterator(data_config, *, global_batch_size: int, seed: int,
                          start_step: int = 0, process_index=None,
                          process_count=None, with_ids: bool = False, source=None,
                          num_threads: Optional[int] = None) -> TrainIterator:
  """Infinite iterator of train host batches (numpy), see the module doc.

  Returns dicts {'images': [B, S, S, 3] (normalised, data_config.dtype),
  'labels': float32 [B, classes] (one-hot, label-smoothed, MixUp/CutMix-mixed)}
  with B = global_batch_size // process_count.
  """
  layout = get_layout(global_batch_size, process_index, process_count)
  source = source or get_source(data_config)
  ds, name_positions = _build_train(
      data_config, global_batch_size=global_batch_size, seed=seed,
      start_step=start_step, process_index=layout.process_index,
      process_count=layout.process_count, source=source, with_ids=with_ids,
      num_threads=num_threads)
  mixing = bool(data_config.mixup_alpha or data_config.cutmix)
  raw_b = layout.per_host_batch * (2 if mixing else 1)
  return TrainIterator(ds, int(start_step) * raw_b, source.name, name_positions)


# ---------------------------------------------------------------------------
# Eval.
def create_eval_iterator(data_config, *, global_batch_size: int,
                         process_index=None, process_count=None,
                         with_ids: bool = False, source=None,
                         split: Optional[str] = None,
                         num_threads: Optional[int] = None) -> 'EvalIterator':
  """Finite iterator over data_config.eval_split, each example once overall.

  Yields host batches {'images' [B, S, S, 3], 'labels' int32 [B], 'mask'
  float32 [B]} (+ 'ids' int64 if with_ids; -1 for padding). Every host yields
  ceil(ceil(N / process_count) / B) batches. After a full pass the iterator's
  `num_skipped` / `skipped` say which images could not be decoded.
  """
  layout = get_layout(global_batch_size, process_index, process_count)
  source = source or get_source(data_config)
  _check_classes(source, data_config)
  image_size = _image_size(data_config, 'eval_image_size')
  split = split or data_config.eval_split or sources_lib.default_splits(source)[1]
  pieces = resolve_split(source.split_infos, split, where=source.name)
  total = pieces_len(pieces)
  h_start, h_stop = eval_host_range(total, layout.process_index, layout.process_count)
  n_host = h_stop - h_start
  max_host = -(-total // layout.process_count)
  per_host = layout.per_host_batch
  num_batches = -(-max_host // per_host)
  out_dtype = _tf_dtype(data_config)
  host_pieces = slice_pieces(pieces, h_start, h_stop)

  @_no_autograph
  def decode(index, ex):
    image = source.decode_eval(ex['record'], image_size, data_config)
    return {'image': image, 'label': ex['label'], 'id': ex['id'], 'index': index}

  @_no_autograph
  def finish(ex):
    image = tf.ensure_shape(preprocess.normalize(ex['image']), [image_size, image_size, 3])
    return {'images': image, 'labels': tf.cast(ex['label'], tf.int32),
            'mask': tf.constant(1., tf.float32), 'ids': ex['id'],
            'index': ex['index']}

  pad = tf.data.Dataset.from_tensors({
      'images': tf.zeros([image_size, image_size, 3], tf.float32),
      'labels': tf.constant(0, tf.int32), 'mask': tf.constant(0., tf.float32),
      'ids': tf.constant(-1, tf.int64), 'index': tf.constant(-1, tf.int64)}).repeat()
  if n_host > 0:
    ds = source.read(host_pieces).enumerate()
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors(log_warning=False)
    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.concatenate(pad)
  else:
    ds = pad
  ds = ds.take(num_batches * per_host)
  ds = ds.batch(per_host, drop_remainder=True)

  @_no_autograph
  def cast(batch):
    out = {'images': tf.cast(batch['images'], out_dtype), 'labels': batch['labels'],
           'mask': batch['mask'], 'index': batch['index']}
    if with_ids:
      out['ids'] = batch['ids']
    return out

  ds = ds.map(cast, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.prefetch(AUTOTUNE).with_options(_options(num_threads))
  return EvalIterator(ds, source, host_pieces, split, num_batches)


class EvalIterator:
  """Finite numpy iterator of eval host batches.

  After a complete pass: `num_examples` (this host's share of the split),
  `num_skipped` (undecodable images of that share) and `skipped` (their
  names: file paths for an image folder, 'split[index]' otherwise); one
  warning names the first few.
  """

  def __init__(self, ds, source, host_pieces: List[splits_lib.Piece], split: str,
               num_batches: int):
    self._ds = ds
    self._source = source
    self._pieces = host_pieces
    self._split = split
    self.num_batches = num_batches
    self.num_examples = pieces_len(host_pieces)
    self.num_skipped = 0
    self.skipped: List[str] = []
    self._warned = False

  def __len__(self):
    return self.num_batches

  def __iter__(self):
    seen = np.zeros([self.num_examples], bool)
    for batch in self._ds.as_numpy_iterator():
      index = batch.pop('index')
      seen[index[index >= 0]] = True
      yield batch
    missing = np.flatnonzero(~seen)
    self.num_skipped = len(missing)
    self.skipped = [self._source.describe(*splits_lib.locate(self._pieces, int(i)))
                    for i in missing]
    if self.num_skipped:
      # Every pass (raw and EMA weights, each eval step of a run) reads the
      # split again: warn on the first pass, later ones at INFO level.
      log = logging.info if self._warned else logging.warning
      self._warned = True
      log('Eval split %s of %s: skipped %d undecodable image(s) of %d on this '
          'host: %s%s', self._split, self._source.name, self.num_skipped,
          self.num_examples, ', '.join(self.skipped[:5]),
          ', ...' if self.num_skipped > 5 else '')
