"""Times a timm NFNet training step in PyTorch (the reference for benchmark.py).

Runs with the optional torch/timm venv (scripts/setup_torch_env.sh), not with
nfnets' own environment:

  .venv-torch/bin/python scripts/bench_timm.py --batch_size 8 --image_size 192

One step = forward, soft-label cross-entropy, backward, AGC (timm's
adaptive_clip_grad, lambda 0.01, eps 1e-3, classifier excluded as in the
paper), SGD with Nesterov momentum 0.9 and weight decay 2e-5. Fake data,
float32, NCHW (PyTorch's fast layout for grouped convs). After --warmup steps,
--steps steps are timed in --windows windows; the median window gives step_ms.
Prints a table line on stderr and one JSON line on stdout:
{framework:'timm', model, batch_size, image_size, img_per_s, step_ms, threads, ...}.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import timed_windows  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='dm_nfnet_f0', help='timm model name')
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--image_size', type=int, default=192)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--threads', type=int, default=None,
                 help='torch.set_num_threads (default: schedulable CPUs)')
  p.add_argument('--steps', type=int, default=6, help='timed steps')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps')
  p.add_argument('--windows', type=int, default=None,
                 help='timing windows (default min(steps, 5))')
  p.add_argument('--channels_last', action='store_true',
                 help='NHWC memory format (slower for grouped convs)')
  p.add_argument('--agc', type=float, default=0.01, help='AGC lambda (0=off)')
  args = p.parse_args(argv)

  import torch
  import timm
  from timm.utils import adaptive_clip_grad

  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = timm.create_model(args.model, pretrained=False,
                            num_classes=args.num_classes)
  model.train()
  fmt = torch.channels_last if args.channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  head = {id(q) for q in model.get_classifier().parameters()}
  clip_params = [q for q in model.parameters() if id(q) not in head]
  decay = [q for q in model.parameters() if q.ndim > 1]
  no_decay = [q for q in model.parameters() if q.ndim <= 1]
  lr = 0.1 * args.batch_size / 256
  opt = torch.optim.SGD([{'params': decay, 'weight_decay': 2e-5},
                         {'params': no_decay, 'weight_decay': 0.0}],
                        lr=lr, momentum=0.9, nesterov=True)
  x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
  x = x.contiguous(memory_format=fmt)
  labels = torch.randint(0, args.num_classes, (args.batch_size,))
  y = torch.nn.functional.one_hot(labels, args.num_classes).float()

  def step():
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = torch.sum(-y * torch.log_softmax(logits, -1), -1).mean()
    loss.backward()
    if args.agc:
      adaptive_clip_grad(clip_params, clip_factor=args.agc, eps=1e-3)
    opt.step()
    return loss

  t0 = time.perf_counter()
  for _ in range(args.warmup):
    step()
  warmup_s = time.perf_counter() - t0
  last = {}

  def run(n):
    for _ in range(n):
      last['loss'] = step()
    float(last['loss'].detach())  # synchronise (CPU ops are synchronous anyway)

  times, cpu_times = timed_windows(run, args.steps, args.windows)
  step_s = statistics.median(times)
  res = {
      'framework': 'timm', 'model': args.model,
      'batch_size': args.batch_size, 'image_size': args.image_size,
      'dtype': 'f32', 'img_per_s': round(args.batch_size / step_s, 4),
      'step_ms': round(step_s * 1e3, 3),
      'step_ms_windows': [round(t * 1e3, 3) for t in times],
      # Process CPU time (all threads) per step: less sensitive to other
      # processes' load than wall time, but includes OpenMP spin-waiting.
      'step_cpu_ms': round(statistics.median(cpu_times) * 1e3, 3),
      'warmup_s': round(warmup_s, 3), 'threads': threads,
      'channels_last': args.channels_last, 'agc': args.agc,
      'torch_version': torch.__version__, 'timm_version': timm.__version__,
      'load_avg_1m': round(os.getloadavg()[0], 2),
      'params': sum(q.numel() for q in model.parameters()),
  }
  print(f"timm {args.model} b={args.batch_size} {args.image_size}px f32 "
        f"threads={threads}: {res['step_ms']:.1f} ms/step, "
        f"{res['img_per_s']:.2f} img/s (load {res['load_avg_1m']})",
        file=sys.stderr)
  print(json.dumps(res), flush=True)


if __name__ == '__main__':
  main()
