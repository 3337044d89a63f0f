"""Evaluate NFNet weights: top-1 / top-5 over a whole eval split, with img/s.

  python scripts/eval.py --checkpoint F0_haiku.npz --variant F0 \\
      --data_dir ~/tensorflow_datasets            # ImageNet val, 256 px
  python scripts/eval.py --checkpoint F0_safe.npz --dataset fake \\
      --fake_examples 512 --image_size 64          # smoke test, no data
  python scripts/eval.py --checkpoint /tmp/workdir --params raw \\
      --dataset digits                              # our own checkpoint
  python scripts/eval.py --checkpoint model.safetensors \\
      --data_dir ~/tensorflow_datasets  # timm/eca_nfnet_l0 (Hugging Face)

--checkpoint takes anything `nfnets.checkpoints.load_pretrained` reads: the
released pickles (loaded without executing code), our .npz / orbax files,
a training workdir, timm's model.safetensors (dm_nfnet_f0..f6,
eca_nfnet_l0..l2, nfnet_l0, nf_resnet50). The variant is inferred from the
weights unless given.
Images are resized to (size + 32)^2 and centre-cropped to the variant's test
resolution (or --image_size; digits default to their native 32 px). Runs
data-parallel on every device of every host (--backend pmap or jit, the
training loop's device seam); every example
of the split is counted exactly once (padding is masked out), so the
accuracy is exact for any batch size.
"""
import argparse
import itertools
import json
import sys
import time
from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

import nfnets.checkpoints as C
import nfnets.models as M
from nfnets import errors
from nfnets import runtime

_EVAL_SPLIT = {'imagenet2012': 'validation', 'digits': 'test',
               'fake': 'validation'}


def make_data_config(dataset: str, image_size: int, data_dir=None,
                     split: Optional[str] = None, fake_examples=None,
                     num_classes: Optional[int] = None
                     ) -> ml_collections.ConfigDict:
  """The config.data fields (nfnets/config.py) that evaluation reads."""
  from nfnets import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.base_config().data  # every data knob, at its default
  cfg.update(dict(
      name=dataset, data_dir=data_dir, train_split='train',
      eval_split=split or _EVAL_SPLIT.get(dataset, 'validation'),
      image_size=image_size, eval_image_size=image_size, randaug='',
      mixup_alpha=0.0, cutmix=False, label_smoothing=0.0,
      resize_method='bicubic', cache=False,
      num_classes=num_classes or (10 if dataset == 'digits' else 1000),
      dtype='float32'))
  if fake_examples:
    cfg.fake_eval_examples = int(fake_examples)
  return cfg


def evaluate(params: Mapping[str, Any], variant: str,
             data_config: ml_collections.ConfigDict, *, batch_size: int,
             model_kwargs: Optional[Mapping[str, Any]] = None,
             max_batches: Optional[int] = None, log_every: int = 0,
             compute_dtype: str = 'float32', backend: str = 'pmap'
             ) -> Dict[str, float]:
  """Top-1/top-5/loss over the eval split; sums over all devices and hosts.

  The training loop's eval step and device seam
  (nfnets.training.parallel.make(backend), nfnets.training.setup.evaluate).
  img/s counts the images after the first batch (which includes compilation)
  over the wall time from the end of the first batch to the last result.
  """
  # pylint: disable=g-import-not-at-top
  from nfnets import data
  from nfnets.training import parallel, setup, step
  # pylint: enable=g-import-not-at-top
  num_classes = C.summarize(params).num_classes
  if num_classes is not None and num_classes < data_config.num_classes:
    raise ValueError(f'the weights have {num_classes} classes but '
                     f'{data_config.name} has {data_config.num_classes}.')
  forward = M.forward_fn(variant, num_classes or data_config.num_classes,
                         **dict(model_kwargs or {}))
  dp = parallel.make(ml_collections.ConfigDict(dict(backend=backend,
                                                    fsdp=False)))
  eval_fn = dp.eval_step(step.make_eval_step(forward,
                                             jnp.dtype(compute_dtype)))
  params = dp.put_state(params)
  devices = dp.num_devices
  if batch_size % devices:
    batch_size = -(-batch_size // devices) * devices
    print(f'batch size rounded up to {batch_size} ({devices} devices)')
  it = data.create_eval_iterator(data_config, global_batch_size=batch_size)
  total_batches = getattr(it, 'num_batches', None)
  if max_batches is not None:
    it = itertools.islice(it, max_batches)
  first = {}

  def on_batch(i, totals):
    if i == 0:  # compilation + first batch
      first.update(dp.fetch(totals), time=time.time())
    if log_every and (i + 1) % log_every == 0:
      t = dp.fetch(totals)
      print(f'batch {i + 1}: top-1 {t["top1"] / max(t["count"], 1):.4f} '
            f'({int(t["count"])} images)', flush=True)

  start = time.time()
  try:
    totals = setup.evaluate(
        dp, eval_fn, params,
        ({k: b[k] for k in ('images', 'labels', 'mask')} for b in it),
        on_batch=on_batch)
  except ValueError as e:
    raise ValueError(f'{data_config.name}:{data_config.eval_split} is empty.'
                     ) from e
  end = time.time()
  count = max(totals['count'], 1.0)
  steady_images = totals['count'] - float(first['count'])
  complete = max_batches is None or (total_batches is not None
                                     and total_batches <= max_batches)
  return dict(
      top1=totals['top1'] / count, top5=totals['top5'] / count,
      loss=totals['loss'] / count, count=int(totals['count']),
      seconds=end - start,
      images_per_sec=(steady_images / (end - first['time'])
                      if steady_images > 0
                      else totals['count'] / max(end - start, 1e-9)),
      devices=devices, batch_size=batch_size, complete=bool(complete))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True)
  p.add_argument('--variant', default=None, help='default: inferred')
  p.add_argument('--dataset', default='imagenet2012',
                 choices=('imagenet2012', 'digits', 'fake'))
  p.add_argument('--data_dir', default=None)
  p.add_argument('--split', default=None,
                 help='tfds split (default: validation; digits: test)')
  p.add_argument('--image_size', type=int, default=None,
                 help="default: the variant's test size (digits: 32)")
  p.add_argument('--batch_size', type=int, default=64, help='global batch')
  p.add_argument('--params', choices=('ema', 'raw'), default='ema',
                 help='which params of our own checkpoints')
  p.add_argument('--model_kwargs', default=None,
                 help='JSON constructor overrides, e.g. \'{"width": 0.5}\'')
  p.add_argument('--fake_examples', type=int, default=None,
                 help='size of the fake eval split (default 50000)')
  p.add_argument('--max_batches', type=int, default=None,
                 help='stop early (smoke tests; result marked incomplete)')
  p.add_argument('--compute_dtype', choices=('float32', 'bfloat16'),
                 default='float32', help='bfloat16 is faster on accelerators')
  p.add_argument('--backend', choices=('pmap', 'jit'), default='pmap',
                 help='device layout (nfnets.training.parallel)')
  p.add_argument('--distributed', action='store_true',
                 help='multi-host: call jax.distributed.initialize() first')
  p.add_argument('--log_every', type=int, default=0)
  p.add_argument('--json_out', default=None, help='also write results here')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  runtime.configure_cpu_runtime()  # before JAX starts (nfnets/runtime.py)
  runtime.keep_tensorflow_off_accelerators()
  if args.distributed:
    jax.distributed.initialize()
  model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
  if 'depth' in model_kwargs:
    model_kwargs['depth'] = tuple(model_kwargs['depth'])
  try:
    params = C.load_pretrained(args.checkpoint, args.variant, which=args.params,
                               model_kwargs=model_kwargs)
  except (C.CheckpointError, FileNotFoundError) as e:
    return errors.report(e)
  variant = args.variant or C.infer_variant(params)
  image_size = args.image_size or (
      32 if args.dataset == 'digits' else M.get_variant(variant).test_size)
  data_config = make_data_config(args.dataset, image_size, args.data_dir,
                                 args.split, args.fake_examples)
  try:
    res = evaluate(params, variant, data_config, batch_size=args.batch_size,
                   model_kwargs=model_kwargs, max_batches=args.max_batches,
                   log_every=args.log_every, compute_dtype=args.compute_dtype,
                   backend=args.backend)
  except (FileNotFoundError, ValueError) as e:  # e.g. DatasetNotPreparedError
    return errors.report(e)
  res.update(checkpoint=args.checkpoint, variant=variant,
             compute_dtype=args.compute_dtype,
             dataset=args.dataset, split=data_config.eval_split,
             image_size=image_size, params=args.params)
  print(f'{variant} on {args.dataset}:{data_config.eval_split} at '
        f'{image_size}px: top-1 {100 * res["top1"]:.2f}%  top-5 '
        f'{100 * res["top5"]:.2f}%  loss {res["loss"]:.4f}  '
        f'({res["count"]} images, {res["images_per_sec"]:.1f} img/s on '
        f'{res["devices"]} device(s), {res["seconds"]:.1f} s)'
        + ('' if res['complete'] else '  [INCOMPLETE: --max_batches]'))
  if args.json_out and jax.process_index() == 0:
    with open(args.json_out, 'w') as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
