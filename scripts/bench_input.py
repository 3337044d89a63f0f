"""Input-pipeline throughput: the ImageNet train pipeline on synthetic JPEGs.

Feeds in-memory JPEG strings of ImageNet-like size (~500x375, photo-like
content, ~100 KB) through exactly the train path of every tfds / folder
source (nfnets.data.pipeline.build_train_dataset with an InMemorySource:
inception crop decoded from the JPEG, flip, resize, MixUp + CutMix as in the
release (two raw images decoded per output example), optional RandAugment on
the mixed image, normalisation, label smoothing, host batches).

Reports, per (image size, RandAugment on/off, tf.data threads), in OUTPUT
examples (each made of two decoded images when mixing):
  * ex/s (wall clock) for this host, and
  * ex per CPU-second = examples / (user + sys CPU time of this process),
    which is the per-core throughput and does not depend on what else runs on
    the machine (the wall-clock figure does).

  python scripts/bench_input.py                      # 192 & 256 px, RA off/on, 1 & all threads
  python scripts/bench_input.py --sizes 192 --threads 1 --batches 10
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


def bench(source, size, randaug, threads, batch, batches, warmup, mixing=True,
          augment_before_mix=False):
  cfg = ml_collections.ConfigDict(config_lib.base_config().data.to_dict())
  cfg.lock()
  cfg.update(dict(
      name='imagenet2012', train_split='train', image_size=size,
      randaug='405' if randaug else '', mixup_alpha=0.2 if mixing else 0.0,
      cutmix=mixing, augment_before_mix=augment_before_mix, label_smoothing=0.1,
      shuffle_buffer=None, num_classes=1000, dtype='bfloat16'))
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=int, nargs='+', default=[192, 256])
  parser.add_argument('--threads', type=int, nargs='+', default=None,
                      help='tf.data private threadpool sizes (default: 1 and all cores)')
  parser.add_argument('--randaug', choices=['off', 'on', 'both'], default='both')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batches', type=int, default=16)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--num_images', type=int, default=512)
  parser.add_argument('--no_mixing', action='store_true',
                      help='MixUp and CutMix off (one decoded image per example)')
  parser.add_argument('--augment_before_mix', action='store_true',
                      help='RandAugment the raw images, not the mixed ones')
  args = parser.parse_args()

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
  print(f'{"px":>4} {"RandAug":>8} {"threads":>7} {"ex/s (wall)":>12} '
        f'{"ex/CPU-s":>9} {"CPU busy":>9}')
  ra_opts = {'off': [False], 'on': [True], 'both': [False, True]}[args.randaug]
  for size in args.sizes:
    for ra in ra_opts:
      for t in threads:
        wall, per_cpu, busy = bench(source, size, ra, t, args.batch, args.batches,
                                    args.warmup, not args.no_mixing,
                                    args.augment_before_mix)
        print(f'{size:>4} {"405" if ra else "off":>8} {t:>7} {wall:>12.0f} '
              f'{per_cpu:>9.0f} {busy:>8.2f}x', flush=True)
  print(f'load average at end {os.getloadavg()}')


if __name__ == '__main__':
  main()
