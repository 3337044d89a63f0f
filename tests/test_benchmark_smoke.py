"""Smoke test of scripts/benchmark.py: a tiny F0 for a few steps of the real
training step; checks the JSON line's fields. No timing assertions."""
import json
import os
import platform
import sys

import background

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'benchmark.py')

POSITIVE = ('img_per_s', 'step_ms', 'step_cpu_ms', 'compile_s',
            'peak_mem_bytes', 'params', 'fwd_macs_per_image',
            'fwd_flops_per_image', 'train_flops_per_image',
            'achieved_tflops', 'peak_tflops', 'mfu', 'threads')


@background.job
def benchmark_run(tmp):
  """(scripts/benchmark.py's run, its --json_out file) for a tiny F0."""
  out = tmp / 'bench.jsonl'
  cmd = [sys.executable, SCRIPT, '--model', 'F0', '--width', '0.0625',
         '--depth', '1,1,1,1', '--group_size', '8', '--image_size', '16',
         '--batch_size', '2', '--num_classes', '10', '--steps', '2',
         '--warmup', '1', '--dtype', 'f32', '--peak_tflops', '1.0',
         '--json_out', str(out)]
  return background.run(cmd, timeout=600, cwd=REPO,
                        env=background.env(PYTHONPATH=REPO)), out


def test_benchmark_tiny_f0_json(benchmark_run):
  proc, out = benchmark_run
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  assert len(lines) == 1, proc.stdout
  res = json.loads(lines[0])
  assert json.loads(out.read_text().strip()) == res
  assert res['framework'] == 'jax' and res['model'] == 'F0'
  assert res['step_impl'] == 'nfnets.training'  # the real pmap'd step
  assert res['batch_size'] == 2 and res['image_size'] == 16
  assert res['devices'] == 1 and res['dtype'] == 'f32'
  for key in POSITIVE:
    assert isinstance(res[key], (int, float)) and res[key] > 0, (key, res)
  assert res['train_flops_per_image'] == 3 * res['fwd_flops_per_image']
  assert res['fwd_flops_per_image'] == 2 * res['fwd_macs_per_image']
  assert len(res['step_ms_windows']) == 2
  assert res['device_kind'] and res['peak_mem_source']
  assert 'img/s' in proc.stderr and 'MFU' in proc.stderr  # the table
  # A fresh CPU-only process: nfnets.runtime's settings were applied.
  from nfnets import runtime
  if platform.libc_ver()[0] == 'glibc' and runtime.cpu_only():
    assert res['cpu_runtime'] == {'status': 'on', 'malloc': 'no mmap, no trim',
                                  'dispatch': 'synchronous'}
