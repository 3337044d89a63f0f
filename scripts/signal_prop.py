"""Signal propagation plots (SPPs, Brock et al. 2021a) at initialisation.

For N(0, 1) inputs, records after every residual block: the channel-averaged
squared channel mean, the channel-averaged channel variance, and the variance
of the residual branch. Writes a CSV and a PNG.

  python scripts/signal_prop.py --model F0 --out_dir /tmp/spp
  python scripts/signal_prop.py --model nf_resnet50 --skip_gain 1.0

--skip_gain sets every block's skip gain (0 = the initialisation; 1 shows
how the residual branches add alpha^2 of variance per block, reset at each
transition, which the beta = 1/expected_std schedule assumes).
"""
import argparse
import csv
import os
from typing import Dict, List

import jax
import jax.numpy as jnp

import nfnets.models as M
from nfnets.models import layers


def compute(model: str, image_size: int = 64, batch_size: int = 8,
            skip_gain: float = 0.0, seed: int = 0, **overrides
            ) -> List[Dict[str, float]]:
  """Per-block statistics at initialisation on N(0, 1) inputs."""
  fwd = M.forward_fn(model, num_classes=1000, **overrides)
  x = jax.random.normal(jax.random.PRNGKey(seed + 1),
                        (batch_size, image_size, image_size, 3))
  params = M.init_params(fwd, jax.random.PRNGKey(seed), x, False)
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: (jnp.full_like(v, skip_gain)
                    if 'skip_gain' in jax.tree_util.keystr(p) else v), params)
  out = jax.jit(lambda p, x: fwd.apply(p, None, x, False, True))(params, x)
  spec = M.get_variant(model)
  slots = layers.block_schedule(overrides.get('depth', spec.depth),
                                overrides.get('alpha', 0.2))
  rows = []
  for s in slots:
    i = s.index
    rows.append({'block': i, 'stage': s.stage, 'transition': int(s.first_in_stage),
                 'beta': s.beta,
                 'avg_sq_mean': float(out[f'block_{i}/avg_sq_mean']),
                 'avg_var': float(out[f'block_{i}/avg_var']),
                 'res_avg_var': float(out[f'block_{i}/res_avg_var'])})
  return rows


def write(rows, out_dir: str, title: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'spp.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  blocks = [r['block'] for r in rows]
  for ax, key, label in zip(axes, ('avg_sq_mean', 'avg_var', 'res_avg_var'),
                            ('avg. squared channel mean',
                             'avg. channel variance',
                             'residual branch variance')):
    ax.plot(blocks, [r[key] for r in rows], 'o-')
    for r in rows:
      if r['transition']:
        ax.axvline(r['block'], color='grey', alpha=0.3, lw=1)
    ax.set_xlabel('block')
    ax.set_title(label)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'spp.png'), dpi=100)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='F0')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--skip_gain', type=float, default=0.0)
  parser.add_argument('--out_dir', default='spp')
  args = parser.parse_args(argv)
  rows = compute(args.model, args.image_size, args.batch_size, args.skip_gain)
  write(rows, args.out_dir, f'{args.model} at init, N(0,1) inputs, '
        f'{args.image_size}px, skip_gain={args.skip_gain}')
  print(f'{"block":>5} {"stage":>5} {"sq_mean":>10} {"var":>10} {"res_var":>10}')
  for r in rows:
    print(f'{r["block"]:>5} {r["stage"]:>5} {r["avg_sq_mean"]:>10.4f} '
          f'{r["avg_var"]:>10.4f} {r["res_avg_var"]:>10.4f}')
  print(f'wrote {args.out_dir}/spp.csv and {args.out_dir}/spp.png')


if __name__ == '__main__':
  main()
