"""Plots a run's curves: python scripts/plot_metrics.py WORKDIR [--out FILE].

Reads WORKDIR/metrics.jsonl and draws train loss, train/eval top-1 (raw and
EMA) and the learning rate against the step, into WORKDIR/metrics.png.
"""
import argparse
import json
import os
import sys


def load(workdir: str):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    sys.exit(f'No metrics.jsonl in {workdir}: is it a training workdir?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(records, key):
  pts = [(r['step'], r[key]) for r in records if key in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(records, out: str, title: str = '') -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  axes[0].plot(*series(records, 'train/loss'), label='train loss')
  axes[0].set_yscale('log')
  for key, label in (('train/top1', 'train top-1 (mixed labels)'),
                     ('eval/top1', 'eval top-1'),
                     ('eval_ema/top1', 'eval top-1 (EMA)')):
    xs, ys = series(records, key)
    if xs:
      axes[1].plot(xs, ys, 'o-' if key.startswith('eval') else '-',
                   label=label)
  # 'train/lr'; metrics files written before the keys were prefixed: 'lr'.
  lr_key = 'train/lr' if any('train/lr' in r for r in records) else 'lr'
  axes[2].plot(*series(records, lr_key), label='learning rate')
  for ax in axes:
    ax.set_xlabel('step')
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out, dpi=100)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('--out', default=None, help='PNG path')
  args = parser.parse_args(argv)
  out = args.out or os.path.join(args.workdir, 'metrics.png')
  plot(load(args.workdir), out, os.path.basename(os.path.normpath(args.workdir)))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
