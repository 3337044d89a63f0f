"""The train pipeline's stages (pipeline.py assembles them; see its doc).

  TrainPlan / train_plan  - the resolved settings of one train pipeline;
  stream_keys             - the independent stateless keys of a (seed, host);
  EpochStream             - this host's records in the seeded epoch order;
  raw_examples            - decode, crop, resize, flip (uint8) per raw example;
  host_batches            - augment_on='host': mixing, RandAugment, normalising;
  device_batches          - augment_on='device': raw pairs + the same draws
                            (the per-pixel work is device_augment.py's).
"""
import dataclasses
from typing import Any, List, Optional

import numpy as np
import tensorflow as tf

from nfnets.errors import DataError
from nfnets.data import mix as mix_lib
from nfnets.data import preprocess
from nfnets.data import randaugment as ra_lib
from nfnets.data import sources as sources_lib
from nfnets.data import splits as splits_lib
from nfnets.data.splits import pieces_len, resolve_split, slice_pieces, train_host_range

AUTOTUNE = tf.data.AUTOTUNE
_BIG = 2 ** 62
no_autograph = sources_lib.no_autograph


def _maybe_xla(fn, use_xla: bool):
  """With data_config.xla (default True) the per-pixel batch work is one
  XLA-compiled function, a single fused pass over the batch: on CPU ~5x
  cheaper than the same TF ops run one by one."""
  return tf.function(fn, jit_compile=True, autograph=False) if use_xla else fn


def _mixed_to_uint8(images):
  # As the release before RandAugment: clip to 0..255, cast (truncates).
  return tf.cast(tf.clip_by_value(images, 0., 255.), tf.uint8)


@dataclasses.dataclass
class TrainPlan:
  """A train pipeline's resolved settings (from the data config and layout)."""
  layout: Any  # pipeline.Layout
  n_classes: int
  image_size: int
  mixup_alpha: float
  use_cutmix: bool
  randaug: Optional[tuple]  # (num_layers, magnitude) or None
  ra_mode: str
  ra_before_mix: bool
  ra_after_mix: bool
  smoothing: float
  out_dtype: tf.DType
  use_xla: bool
  on_device: bool  # augment_on == 'device': ship raw images + draws

  @property
  def mixing(self) -> bool:
    return bool(self.mixup_alpha or self.use_cutmix)

  @property
  def out_b(self) -> int:
    return self.layout.per_host_batch

  @property
  def raw_b(self) -> int:
    return 2 * self.out_b if self.mixing else self.out_b


def _augment_on(data_config) -> bool:
  """True for config.data.augment_on = 'device', False for 'host'."""
  where = str(data_config.get('augment_on', 'host'))
  if where not in ('device', 'host'):
    raise ValueError(f"config.data.augment_on must be 'device' or 'host', got {where!r}.")
  return where == 'device'


def train_plan(data_config, layout, source, *, num_classes: int, image_size: int,
               out_dtype) -> TrainPlan:
  mixup_alpha = float(data_config.mixup_alpha or 0.)
  use_cutmix = bool(data_config.cutmix)
  mixing = bool(mixup_alpha or use_cutmix)
  randaug = preprocess.parse_randaug(data_config.randaug)
  ra_before = bool(randaug) and (not mixing or bool(data_config.augment_before_mix))
  return TrainPlan(
      layout=layout, n_classes=num_classes, image_size=image_size,
      mixup_alpha=mixup_alpha,
      use_cutmix=use_cutmix, randaug=randaug, ra_mode=data_config.randaug_mode,
      ra_before_mix=ra_before, ra_after_mix=bool(randaug) and not ra_before,
      smoothing=float(data_config.label_smoothing or 0.),
      out_dtype=out_dtype, use_xla=bool(data_config.xla),
      on_device=_augment_on(data_config))


def stream_keys(seed: int, process_index: int):
  """Independent stateless keys: epoch order, examples, batches (mixing),
  post-mix RandAugment."""
  key = tf.constant([int(seed), process_index], tf.int64)
  keys = tf.random.experimental.stateless_split(key, 4)
  return dict(zip(('order', 'example', 'batch', 'ra'), [keys[i] for i in range(4)]))


class EpochStream:
  """This host's records in stream order: the host's range cut into chunks,
  each epoch's chunk order a function of (seed, process, epoch), then a
  seeded shuffle buffer (see the module doc)."""

  def __init__(self, source, data_config, plan: TrainPlan, seed: int, order_key):
    layout = plan.layout
    self.source = source
    split = data_config.train_split or sources_lib.default_splits(source)[0]
    pieces = resolve_split(source.split_infos, split, where=source.name)
    total = pieces_len(pieces)
    h_start, h_stop = train_host_range(total, layout.process_index, layout.process_count)
    self.n_host = n_host = h_stop - h_start
    if n_host <= 0:
      raise DataError(f'Split {split!r} ({total} examples) is too small for '
                       f'{layout.process_count} processes.')
    num_chunks = int(data_config.num_chunks or 0) or int(np.clip(n_host // 10000, 1, 64))
    self.num_chunks = max(1, min(num_chunks, n_host))
    ranges = splits_lib.even_ranges(n_host, self.num_chunks)
    self.chunks = []
    for a, b in ranges:
      ds = source.read(slice_pieces(pieces, h_start + a, h_start + b))
      self.chunks.append(ds.cache() if data_config.cache else ds)
    self.chunk_sizes = tf.constant([b - a for a, b in ranges], tf.int64)
    buffer = data_config.shuffle_buffer
    buffer = 10 * plan.out_b if buffer is None else int(buffer)
    self.shuffle_buffer = min(buffer, n_host)
    self.order_key = order_key
    self.shuffle_base = int(seed % (2 ** 31)) * 1_000_003 + layout.process_index * 7919

  def epoch(self, epoch):
    epoch = tf.cast(epoch, tf.int64)
    if self.num_chunks > 1:
      perm = tf.random.experimental.stateless_shuffle(
          tf.range(self.num_chunks, dtype=tf.int64),
          seed=tf.random.experimental.stateless_fold_in(self.order_key, epoch))
      choice = tf.data.Dataset.from_tensor_slices(
          (perm, tf.gather(self.chunk_sizes, perm))).flat_map(
              lambda c, n: tf.data.Dataset.from_tensors(c).repeat(n))
      ds = tf.data.Dataset.choose_from_datasets(self.chunks, choice)
    else:
      ds = self.chunks[0]
    if self.shuffle_buffer > 1:
      ds = ds.shuffle(self.shuffle_buffer, seed=self.shuffle_base + epoch * 104_729,
                      reshuffle_each_iteration=False)
    return ds

  def from_position(self, from_pos: int) -> tf.data.Dataset:
    """(stream position, undecoded record) from position `from_pos` on."""
    first_epoch, offset = divmod(from_pos, self.n_host)
    epoch = no_autograph(self.epoch)
    ds = epoch(first_epoch).skip(offset).concatenate(
        tf.data.Dataset.range(first_epoch + 1, _BIG).flat_map(epoch))
    return ds.enumerate(start=from_pos)

  def names(self, positions: List[int]) -> List[str]:
    """Names of the examples at these stream positions, replayed from the
    undecoded stream: only for sources whose records are cheap to read."""
    if not positions or not self.source.cheap_read:
      return []
    lo, hi = min(positions), max(positions)
    wanted, names = set(positions), []
    for pos, ex in self.from_position(lo).take(hi - lo + 1).as_numpy_iterator():
      if pos in wanted:
        names.append(self.source.describe_record(ex['record'], ex['id']))
    return names


def raw_examples(ds, plan: TrainPlan, source, data_config, example_key):
  """(pos, record) -> decoded, cropped, resized, flipped uint8 raw examples;
  host path: RandAugmented before mixing if so configured, one-hot labels;
  device path: int labels and, before mixing, the RandAugment draws."""
  size = plan.image_size

  @no_autograph
  def decode(pos, ex):
    seed_ = tf.random.experimental.stateless_fold_in(example_key, pos)
    s_crop = preprocess.split_seed(seed_, 3)[0]
    decoded = source.decode_train(ex['record'], s_crop, size, data_config)
    return {'decoded': decoded, 'label': ex['label'], 'id': ex['id'], 'pos': pos}

  @no_autograph
  def augment(ex):
    seed_ = tf.random.experimental.stateless_fold_in(example_key, ex['pos'])
    s_aug, s_ra = tf.unstack(preprocess.split_seed(seed_, 3)[1:])
    image = source.augment_train(ex['decoded'], s_aug, size, data_config)
    image = tf.ensure_shape(preprocess.to_uint8(image), [size, size, 3])
    out = {'pos': ex['pos'], 'id': ex['id']}
    if plan.on_device:  # RandAugment's draws: per batch (_device_batches)
      out['labels'] = tf.cast(ex['label'], tf.int32)
    else:
      if plan.ra_before_mix:
        image = ra_lib.randaugment(image, s_ra, plan.randaug[0], plan.randaug[1],
                                   plan.ra_mode)
      out['labels'] = preprocess.one_hot_smoothed(ex['label'], plan.n_classes,
                                                  plan.smoothing)
    out['images'] = tf.ensure_shape(image, [size, size, 3])
    return out

  ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors(log_warning=False)
  return ds.map(augment, num_parallel_calls=AUTOTUNE, deterministic=True)


def _ra_draws(plan: TrainPlan, seed_of_position):
  """positions int64 [n] -> RandAugment draws {'ra_op' [n, L], 'ra_sign',
  'ra_cut'} of the seeds seed_of_position(pos), as one graph loop over the
  batch (~0.15 CPU-ms per example; as a per-example tf.data map ~1 ms).
  Not XLA-compiled: TF's stateless random ops give other numbers under XLA."""
  layers, size = plan.randaug[0], plan.image_size

  def one(pos):
    return ra_lib.draw_params(seed_of_position(pos), layers, size, size)

  def draws(positions):
    ops, signs, cuts = tf.map_fn(
        one, positions, fn_output_signature=(tf.int32, tf.float32, tf.int32))
    return {'ra_op': ops, 'ra_sign': signs, 'ra_cut': cuts}
  return draws


def host_batches(ds, plan: TrainPlan, keys, with_ids: bool):
  """Raw examples -> finished host batches (the host path): mixing, uint8
  truncation + RandAugment after mixing, normalisation."""
  out_b, size = plan.out_b, plan.image_size
  first_idx, second_idx = mix_lib.pair_indices(out_b, plan.mixup_alpha, plan.use_cutmix)

  def mix_fn(images, labels, lam, box):
    images, labels = mix_lib.apply_params(
        images, labels, {'lam': lam, 'box': box}, plan.mixup_alpha, plan.use_cutmix)
    if plan.ra_after_mix:
      return _mixed_to_uint8(images), labels
    return tf.cast(preprocess.normalize(images), plan.out_dtype), labels

  def normalize_fn(images):
    return tf.cast(preprocess.normalize(images), plan.out_dtype)

  mix_fn = _maybe_xla(mix_fn, plan.use_xla)
  normalize_fn = _maybe_xla(normalize_fn, plan.use_xla)

  @no_autograph
  def finalize(step, batch):
    """Raw batch [raw_b] -> outputs [out_b] (mixed; normalised unless RA follows)."""
    if plan.mixing:
      params = mix_lib.sample_params(
          tf.random.experimental.stateless_fold_in(keys['batch'], step), out_b,
          size, size, plan.mixup_alpha, plan.use_cutmix)
      images, labels = mix_fn(batch['images'], batch['labels'], params['lam'],
                              params['box'])
      out = {'images': images, 'labels': labels}
    else:
      out = {'images': normalize_fn(batch['images']), 'labels': batch['labels']}
    out.update(_pos_and_ids(batch, plan, first_idx, second_idx, with_ids))
    if plan.ra_after_mix:
      out['out_pos'] = step * out_b + tf.range(out_b, dtype=tf.int64)
    return out

  ds = ds.map(finalize, num_parallel_calls=AUTOTUNE, deterministic=True)
  if not plan.ra_after_mix:
    return ds

  @no_autograph
  def post_mix_randaugment(ex):
    s_ra = tf.random.experimental.stateless_fold_in(keys['ra'], ex.pop('out_pos'))
    image = ra_lib.randaugment(ex['images'], s_ra, plan.randaug[0], plan.randaug[1],
                               plan.ra_mode)
    ex['images'] = tf.ensure_shape(image, [size, size, 3])
    return ex

  @no_autograph
  def normalize_batch(batch):
    return dict(batch, images=normalize_fn(batch['images']))

  ds = ds.unbatch().map(post_mix_randaugment, num_parallel_calls=AUTOTUNE,
                        deterministic=True)
  ds = ds.batch(out_b, drop_remainder=True)
  return ds.map(normalize_batch, num_parallel_calls=AUTOTUNE, deterministic=True)


def _pos_and_ids(batch, plan: TrainPlan, first_idx, second_idx, with_ids: bool):
  """'pos' [B, k] (+ 'ids', 'partner_ids') of the outputs of a raw batch."""
  if not plan.mixing:
    out = {'pos': batch['pos'][:, None]}
    if with_ids:
      out['ids'] = batch['id']
    return out
  out = {'pos': tf.stack([tf.gather(batch['pos'], first_idx),
                          tf.gather(batch['pos'], second_idx)], axis=1)}
  if with_ids:
    out['ids'] = tf.gather(batch['id'], first_idx)
    out['partner_ids'] = tf.gather(batch['id'], second_idx)
  return out


def device_batches(ds, plan: TrainPlan, keys, with_ids: bool):
  """Raw examples -> device batches (device_augment.py): each output row's
  raw uint8 image(s) and int labels, the mixing parameters and RandAugment
  draws of the host path (same keys), nothing per-pixel."""
  out_b, size = plan.out_b, plan.image_size
  first_idx, second_idx = mix_lib.pair_indices(out_b, plan.mixup_alpha, plan.use_cutmix)

  def example_seed(pos):  # the host path's s_ra of raw example `pos`
    seed_ = tf.random.experimental.stateless_fold_in(keys['example'], pos)
    return preprocess.split_seed(seed_, 3)[2]

  def output_seed(pos):  # the host path's post-mix RandAugment seed
    return tf.random.experimental.stateless_fold_in(keys['ra'], pos)

  if plan.ra_before_mix:
    raw_draws = _ra_draws(plan, example_seed)
  elif plan.ra_after_mix:
    out_draws = _ra_draws(plan, output_seed)

  @no_autograph
  def finalize(step, batch):
    batch = dict(batch, **raw_draws(batch['pos'])) if plan.ra_before_mix else batch
    per_row = [k for k in ('images', 'labels', 'ra_op', 'ra_sign', 'ra_cut') if k in batch]
    if plan.mixing:
      out = {k: tf.stack([tf.gather(batch[k], first_idx), tf.gather(batch[k], second_idx)],
                         axis=1) for k in per_row}
      out.update(mix_lib.sample_params(
          tf.random.experimental.stateless_fold_in(keys['batch'], step), out_b,
          size, size, plan.mixup_alpha, plan.use_cutmix))
    else:
      out = {k: batch[k][:, None] for k in per_row}
    if plan.ra_after_mix:
      out.update(out_draws(step * out_b + tf.range(out_b, dtype=tf.int64)))
    out.update(_pos_and_ids(batch, plan, first_idx, second_idx, with_ids))
    return out

  return ds.map(finalize, num_parallel_calls=AUTOTUNE, deterministic=True)
