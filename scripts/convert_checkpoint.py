"""Convert NFNet weights to safe formats (and optionally PyTorch layout).

Reads DeepMind's released files (F0_haiku.npz ... F6_haiku.npz, which are dill
pickles) without executing code, validates them against the model, and writes

  * --format npz   : a plain numpy .npz without pickles, one array per
                     parameter under 'module/path:param' (default);
  * --format orbax : a params-only orbax directory;
  * --torch_out    : optionally, the same weights in PyTorch layout with timm's
                     dm_nfnet_* names (.npz always works; .pt needs torch).

  python scripts/convert_checkpoint.py --input F0_haiku.npz --output F0_safe.npz
  python scripts/convert_checkpoint.py --input F0_haiku.npz \\
      --output F0_orbax --format orbax --torch_out F0_timm.npz

Any supported input works (released pickle, our .npz, torch-layout .npz, our
orbax checkpoints with --which ema|raw). Afterwards
`nfnets.checkpoints.load_pretrained(OUTPUT)` and scripts/eval.py read it.
"""
import argparse
import json
import os
import sys

import nfnets.checkpoints as C
from nfnets import errors


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--input', required=True, help='checkpoint to read')
  p.add_argument('--output', default=None,
                 help='where to write (file for npz, directory for orbax); '
                      'omit to only validate / export --torch_out')
  p.add_argument('--format', choices=('npz', 'orbax'), default='npz')
  p.add_argument('--variant', default=None,
                 help='e.g. F0; default: inferred from the weights')
  p.add_argument('--num_classes', type=int, default=None)
  p.add_argument('--which', choices=('ema', 'raw'), default='ema',
                 help='for our own checkpoints holding both')
  p.add_argument('--model_kwargs', default=None,
                 help='JSON constructor overrides, e.g. \'{"width": 0.5}\'')
  p.add_argument('--torch_out', default=None,
                 help='also write PyTorch/timm layout (.npz, or .pt if torch '
                      'is installed)')
  p.add_argument('--overwrite', action='store_true')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
  if model_kwargs and 'depth' in model_kwargs:
    model_kwargs['depth'] = tuple(model_kwargs['depth'])
  if os.path.isfile(args.input):
    # MD5 vs DeepMind's released files; warns if named F<k>_haiku.npz but
    # the digest differs.
    check = C.check_file(args.input)
    print(f'{args.input}: {check.describe()}')
  try:
    params = C.load_pretrained(args.input, args.variant, args.num_classes,
                               which=args.which, model_kwargs=model_kwargs,
                               check_release=False)
  except (C.CheckpointError, FileNotFoundError) as e:
    return errors.report(e)
  summary = C.summarize(params)
  variant = args.variant or C.infer_variant(params)
  print(f'read {args.input}: {variant}, {summary.describe()}')
  for out in (args.output, args.torch_out):
    if out and os.path.exists(out) and not args.overwrite:
      return errors.report(f'{out} exists (use --overwrite)')
  if args.output:
    if args.format == 'npz':
      C.save_npz(params, args.output)
    else:
      if os.path.exists(args.output):
        import shutil  # pylint: disable=g-import-not-at-top
        shutil.rmtree(args.output)
      C.save_orbax(params, args.output, variant=variant,
                   num_classes=summary.num_classes,
                   model_kwargs=model_kwargs)
    print(f'wrote {args.output} ({args.format})')
  if args.torch_out:
    if args.torch_out.endswith('.pt'):
      C.save_torch_pt(params, args.torch_out)
    else:
      C.save_torch_npz(params, args.torch_out)
    print(f'wrote {args.torch_out} (PyTorch layout, timm dm_nfnet_* names)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
