"""Export NFNet weights for serving: StableHLO, TensorFlow SavedModel or ONNX.

  python scripts/export.py --checkpoint F0_safe.npz --format stablehlo --out f0.stablehlo
  python scripts/export.py --checkpoint F0_safe.npz --format savedmodel --out f0_savedmodel
  python scripts/export.py --checkpoint /tmp/ft --format onnx --out ft.onnx \\
      --variant F0 --image_size 192       # a fine-tuning workdir of ours

--checkpoint takes anything `nfnets.checkpoints.load_pretrained` reads; the
class count is the checkpoint's. The exported function takes float32
[batch, size, size, 3] RGB pixels on the 0..255 scale (normalised inside;
batch symbolic) and returns float32 logits [batch, classes]; weight
standardisation is folded in (nfnets/export.py). After writing, the export is
run with its own runtime and compared with the Haiku model (--no_verify
skips that).
"""
import argparse
import json
import sys

from nfnets import errors
from nfnets import runtime


def parse_args(argv=None):
  from nfnets.export import FORMATS  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True)
  p.add_argument('--format', required=True, choices=FORMATS)
  p.add_argument('--out', required=True,
                 help='output file (a directory for savedmodel)')
  p.add_argument('--variant', default=None,
                 help="default: a workdir's config.json, else inferred")
  p.add_argument('--image_size', type=int, default=None,
                 help="fixed input size (default: the variant's test size)")
  p.add_argument('--params', choices=('ema', 'raw'), default='ema',
                 help='which params of our own checkpoints')
  p.add_argument('--model_kwargs', default=None,
                 help='JSON constructor overrides, e.g. \'{"width": 0.5}\'')
  p.add_argument('--platforms', default='cpu,cuda',
                 help='stablehlo: comma-separated platforms to lower for')
  p.add_argument('--no_verify', action='store_true',
                 help='skip running the export against the Haiku model')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  runtime.configure_cpu_runtime()  # before JAX starts (nfnets/runtime.py)
  from nfnets import checkpoints  # pylint: disable=g-import-not-at-top
  from nfnets import export as export_lib  # pylint: disable=g-import-not-at-top
  try:
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
  except ValueError as e:
    return errors.report(f'--model_kwargs is not JSON ({e})')
  try:
    out = export_lib.export(args.checkpoint, args.variant, args.format,
                            args.out, image_size=args.image_size,
                            model_kwargs=model_kwargs, which=args.params,
                            platforms=args.platforms.split(','),
                            verify=not args.no_verify)
  except (checkpoints.CheckpointError, FileNotFoundError, ValueError,
          ImportError) as e:
    return errors.report(e)
  checked = '' if args.no_verify else ' (checked against the Haiku model)'
  print(f'Wrote {args.format} export to {out}{checked}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
