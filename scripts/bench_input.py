"""Input-pipeline throughput: the ImageNet train pipeline on synthetic JPEGs.

Feeds in-memory JPEG strings of ImageNet-like size (~500x375, photo-like
content, ~100 KB) through exactly the train path of every tfds / folder
source (nfnets.data.pipeline.build_train_dataset with an InMemorySource:
inception crop decoded from the JPEG, flip, resize, MixUp + CutMix as in the
release (two raw images decoded per output example), optional RandAugment on
the mixed image, normalisation, label smoothing, host batches).

With --augment_on device (or both), the same recipe with config.data.
augment_on='device': the host decodes, crops, flips and resizes, and ships the
raw uint8 pairs + the random draws; MixUp/CutMix, RandAugment, label
smoothing and normalisation run in JAX inside the train step (not timed
here: --device_cost times that transform on this process's JAX backend).

Reports, per (image size, RandAugment on/off, augment_on, tf.data threads),
in OUTPUT examples (each made of two decoded images when mixing):
  * ex/s (wall clock) for this host, and
  * ex per CPU-second = examples / (user + sys CPU time of this process),
    which is the per-core throughput and does not depend on what else runs on
    the machine (the wall-clock figure does).

  python scripts/bench_input.py                      # 192 & 256 px, RA off/on, 1 & all threads
  python scripts/bench_input.py --sizes 192 --threads 1 --batches 10
  python scripts/bench_input.py --augment_on both --device_cost --breakdown
"""
import argparse
import io
import os
import resource
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from nfnets import config as config_lib
from nfnets import runtime
from nfnets.data import pipeline
from nfnets.data import sources


def synthetic_jpegs(n: int, seed: int = 0, quality: int = 90):
  """Photo-like JPEGs: smooth random fields + texture, sizes around 500x375."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    long_side = int(rng.integers(450, 551))
    if rng.random() < 0.8:  # landscape 4:3, like most ImageNet photos
      w, h = long_side, int(long_side * 0.75)
    else:                   # portrait 3:4
      w, h = int(long_side * 0.75), long_side
    low = rng.integers(0, 256, (max(h // 24, 2), max(w // 24, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.float32)
    img += rng.normal(0, 12, img.shape)  # texture / sensor noise
    img = np.clip(img, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=quality)
    out.append(buf.getvalue())
  return out


def _data_config(size, randaug, mixing=True, augment_before_mix=False,
                 augment_on='host'):
  """The F0 recipe's data config (randaug '405' or off) at `size` px."""
  cfg = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  cfg.lock()
  cfg.update(dict(
      name='imagenet2012', train_split='train', image_size=size,
      randaug='405' if randaug else '', mixup_alpha=0.2 if mixing else 0.0,
      cutmix=mixing, augment_before_mix=augment_before_mix, label_smoothing=0.1,
      shuffle_buffer=None, num_classes=1000, dtype='bfloat16',
      augment_on=augment_on))
  return cfg


def _cpu_seconds():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def bench(source, size, randaug, threads, batch, batches, warmup, mixing=True,
          augment_before_mix=False, augment_on='host'):
  cfg = _data_config(size, randaug, mixing, augment_before_mix, augment_on)
  ds = pipeline.build_train_dataset(
      cfg, global_batch_size=batch, seed=0, process_index=0, process_count=1,
      source=source, num_threads=threads)
  it = ds.as_numpy_iterator()
  for _ in range(warmup):
    next(it)
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  wall = time.perf_counter() - t0
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  n = batches * batch
  return n / wall, n / cpu, cpu / wall


def device_cost(size, randaug, batch=64, reps=5, mixing=True):
  """ms (wall) and CPU-ms per batch of `batch` of the device transform, jitted
  on this process's default JAX backend, on a batch shaped like the
  pipeline's device batches (random pixels; the cost does not depend on them)."""
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets.data import device_augment  # pylint: disable=g-import-not-at-top
  cfg = _data_config(size, randaug, mixing, augment_on='device')
  rng = np.random.default_rng(0)
  k = 2 if mixing else 1
  raw = {'images': rng.integers(0, 256, (batch, k, size, size, 3), dtype=np.uint8),
         'labels': rng.integers(0, 1000, (batch, k)).astype(np.int32)}
  if mixing:
    raw['lam'] = rng.uniform(0, 1, batch).astype(np.float32)
    raw['box'] = np.sort(rng.integers(0, size, (batch, 2, 2)), axis=1
                         ).transpose(0, 2, 1).reshape(batch, 4).astype(np.int32)
  if randaug:
    raw.update(ra_op=rng.integers(0, 16, (batch, 4)).astype(np.int32),
               ra_sign=rng.choice([-1., 1.], (batch, 4)).astype(np.float32),
               ra_cut=rng.integers(0, size, (batch, 4, 2)).astype(np.int32))
  fn = jax.jit(device_augment.make_batch_transform(cfg))
  x = jax.device_put(raw)
  jax.block_until_ready(fn(x))
  c0, t0 = _cpu_seconds(), time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(fn(x))
  return ((time.perf_counter() - t0) / reps * 1e3, (_cpu_seconds() - c0) / reps * 1e3,
          jax.devices()[0].device_kind)


def breakdown(source, jpegs, size, batch, batches, mixing=True):
  """CPU-ms per output example of the device path's host stages, one thread:
  decode (inception crop decoded from the JPEG), + resize/flip/uint8, the
  whole device-path pipeline (+ batching, pairing, draws), and the host ->
  device copy of its batches (jax.device_put on this backend)."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cfg = _data_config(size, True, mixing, augment_on='device')
  n_raw = batch * batches * (2 if mixing else 1)
  ds0 = pipeline.build_train_dataset(cfg, global_batch_size=batch, seed=0, process_index=0,
                                     process_count=1, source=source, num_threads=1)
  recs = tf.data.Dataset.from_tensor_slices(tf.constant(jpegs)).repeat().enumerate()

  def decode(i, rec):
    return source.decode_train(rec, tf.stack([tf.constant(0, tf.int64), i]), size, cfg)

  def decode_resize(i, rec):
    return source.augment_train(decode(i, rec), tf.stack([tf.constant(1, tf.int64), i]),
                                size, cfg)

  out = {}
  opts = pipeline._options(1)  # pylint: disable=protected-access
  for name, ds in (('decode', recs.map(decode)),
                   ('decode+resize/flip', recs.map(decode_resize))):
    it = iter(ds.take(n_raw + 8).with_options(opts).as_numpy_iterator())
    for _ in range(8):
      next(it)
    c0 = _cpu_seconds()
    for _ in it:
      pass
    out[name] = (_cpu_seconds() - c0) * 1e3 / (batch * batches)
  it = ds0.as_numpy_iterator()
  next(it)
  c0 = _cpu_seconds()
  kept = [next(it) for _ in range(batches)]
  out['device-path pipeline'] = (_cpu_seconds() - c0) * 1e3 / (batch * batches)
  jax.block_until_ready(jax.device_put(kept[0]))
  c0 = _cpu_seconds()
  for b in kept:
    jax.block_until_ready(jax.device_put(b))
  out['device_put'] = (_cpu_seconds() - c0) * 1e3 / (batch * batches)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[192, 256])
  parser.add_argument('--threads', type=int, nargs='+', default=None,
                      help='tf.data private threadpool sizes (default: 1 and all cores)')
  parser.add_argument('--randaug', choices=['off', 'on', 'both'], default='both')
  parser.add_argument('--augment_on', choices=['host', 'device', 'both'], default='both',
                      help="config.data.augment_on: 'host' (today's path), 'device' or both")
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batches', type=int, default=16)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--no_mixing', action='store_true',
                      help='MixUp and CutMix off (one decoded image per example)')
  parser.add_argument('--augment_before_mix', action='store_true',
                      help='RandAugment the raw images, not the mixed ones')
  parser.add_argument('--device_cost', action='store_true',
                      help='also time the device transform (JAX default backend), batch 64')
  parser.add_argument('--breakdown', action='store_true',
                      help="also split the device path's host CPU time by stage")
  args = parser.parse_args()
  # TF only feeds the pipeline: on a GPU machine it must not reserve the GPU
  # memory that --device_cost's JAX needs.
  runtime.keep_tensorflow_off_accelerators()

  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  threads = args.threads or sorted({1, cores})
  jpegs = synthetic_jpegs(args.num_images)
  sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:64]]
  labels = np.random.default_rng(1).integers(0, 1000, len(jpegs))
  source = sources.InMemorySource(jpegs, labels, num_classes=1000)
  print(f'{len(jpegs)} synthetic JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB, '
        f'mean size {np.mean([s[0] for s in sizes]):.0f}x{np.mean([s[1] for s in sizes]):.0f}; '
        f'{cores} CPU cores; load average at start {os.getloadavg()}')
  mixing = ('none (1 decoded image per example)' if args.no_mixing else
            'MixUp+CutMix (2 decoded images per example), RandAugment '
            + ('before' if args.augment_before_mix else 'after') + ' mixing')
  print(f'batch {args.batch}, {args.batches} timed batches after {args.warmup} warm-up; '
        f'mixing: {mixing}; label smoothing, bf16 output')
  print(f'{"px":>4} {"RandAug":>8} {"augment_on":>10} {"threads":>7} {"ex/s (wall)":>12} '
        f'{"ex/CPU-s":>9} {"CPU busy":>9}')
  ra_opts = {'off': [False], 'on': [True], 'both': [False, True]}[args.randaug]
  where_opts = {'host': ['host'], 'device': ['device'],
                'both': ['host', 'device']}[args.augment_on]
  for size in args.sizes:
    for ra in ra_opts:
      for where in where_opts:
        for t in threads:
          wall, per_cpu, busy = bench(source, size, ra, t, args.batch, args.batches,
                                      args.warmup, not args.no_mixing,
                                      args.augment_before_mix, where)
          print(f'{size:>4} {"405" if ra else "off":>8} {where:>10} {t:>7} {wall:>12.0f} '
                f'{per_cpu:>9.0f} {busy:>8.2f}x', flush=True)
  if args.device_cost:
    for size in args.sizes:
      for ra in ra_opts:
        ms, cpu_ms, kind = device_cost(size, ra, mixing=not args.no_mixing)
        print(f'device transform {size} px RandAug {"405" if ra else "off"} on {kind}: '
              f'{ms:.1f} ms per batch of 64 ({cpu_ms:.0f} CPU-ms)', flush=True)
  if args.breakdown:
    for size in args.sizes:
      parts = breakdown(source, jpegs, size, 64, max(2, args.batches // 2), not args.no_mixing)
      print(f'device path host CPU-ms per output example, {size} px: ' +
            ', '.join(f'{k} {v:.2f}' for k, v in parts.items()), flush=True)
  print(f'load average at end {os.getloadavg()}')


if __name__ == '__main__':
  main()
