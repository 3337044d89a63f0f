"""Prints a summary table of the model zoo: `python -m nfnets.models [NAMES...]`."""
import sys

from nfnets.models import count_flops, count_params, get_variant, variants


def main(argv):
  names = argv[1:] or [v for v in variants() if not v.endswith('+')]
  print(f'{"variant":<16}{"params (M)":>12}{"FLOPs (B)":>12}{"train px":>10}'
        f'{"test px":>9}  {"RandAug":<8}{"dropout":>8}')
  for name in names:
    spec = get_variant(name)
    params = count_params(name) / 1e6
    flops = count_flops(name) / 1e9
    print(f'{spec.name:<16}{params:>12.1f}{flops:>12.2f}{spec.train_size:>10}'
          f'{spec.test_size:>9}  {spec.randaug or "-":<8}{spec.dropout:>8.2f}',
          flush=True)


if __name__ == '__main__':
  main(sys.argv)
