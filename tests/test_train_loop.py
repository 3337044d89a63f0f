"""The experiment loop end to end on the embedded digits (tiny model)."""
import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import nfnets.models as M
from nfnets import config as config_lib
from nfnets.checkpoints import run as checkpointing
from nfnets.training.loop import train_and_evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_images  # noqa: E402
import train_utils  # noqa: E402

REPO = train_utils.REPO


def _load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('name,arg', [('f0', None)] +
                         [('nfnet', f'F{i}') for i in range(1, 8)] +
                         [('nf_resnet50', None), ('nf_regnet_b0', None),
                          ('demo', None), ('finetune', None)])
def test_configs_load_and_build(name, arg):
  config = _load_config(os.path.join(REPO, 'configs', f'{name}.py'), arg)
  config_lib.validate(config, num_devices=8)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.train.batch_sise = 3  # locked: typos fail
  classes = 10 if config.data.name == 'digits' else 1000  # the dataset's
  config = config_lib.resolve(config, classes)
  config_lib.validate(config, num_devices=8)
  shapes = M.param_shapes(config.model.name, config.model.num_classes,
                          **config_lib.model_kwargs(config))
  assert shapes
  if name in ('f0', 'nfnet'):
    spec = M.get_variant(config.model.name)
    assert config.model.name == (arg or 'F0')
    assert (config.data.image_size, config.data.eval_image_size) == (
        spec.train_size, spec.test_size)
    assert config.data.randaug == spec.randaug  # the variant's own level
    assert config.train.batch_size == 4096 and config.train.num_epochs == 360


def test_bad_override_names_the_field(tmp_path):
  proc = train_utils.run_train_subprocess(
      ['--config=configs/demo.py', f'--workdir={tmp_path}',
       '--config.train.batch_sise=32'])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert 'batch_sise' in out
  proc = train_utils.run_train_subprocess(
      ['--config=configs/demo.py', f'--workdir={tmp_path}',
       '--config.model.name=F9'])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0 and 'config.model.name' in out and 'F9' in out


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  return [r for r in records if 'train/loss' in r], [
      r for r in records if 'eval/top1' in r]


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                         'checkpoints'))
                if s.isdigit())


TOTAL = train_utils.TOTAL


def test_train_eval_logs_and_mismatch(tiny_pmap_run, tmp_path):
  workdir, results = tiny_pmap_run
  # Every one of the 300 test digits counted exactly once (64-example eval
  # batches over 8 devices: the last batch is padded and masked).
  assert results['eval/count'] == 300 and results['eval_ema/count'] == 300
  assert 0 <= results['eval/top1'] <= results['eval/top5'] <= 1
  train, evals = _train_records(workdir)
  assert [r['step'] for r in train] == list(range(1, TOTAL + 1))
  for key in ('train/loss', 'train/top1', 'train/lr', 'train/throughput',
              'train/grad_norm'):
    assert all(np.isfinite(r[key]) for r in train), key
  assert evals and {'eval/top5', 'eval_ema/top1'} <= set(evals[-1])
  assert json.load(open(os.path.join(workdir, 'config.json')))['model'][
      'name'] == 'F0'
  assert _steps(workdir) == [6, 9, 12]  # every 3 steps, the last 3 kept
  assert glob.glob(os.path.join(workdir, 'tb', '*'))
  # The same workdir with another model (here: another class count, on an
  # image folder) fails clearly, and keeps the checkpoints.
  copy = str(tmp_path / 'run')
  shutil.copytree(os.path.join(workdir, 'checkpoints'),
                  os.path.join(copy, 'checkpoints'))
  folder = str(tmp_path / 'images')
  test_images.write_folder(folder)
  other = train_utils.tiny_config(extra={
      'data.name': 'folder', 'data.data_dir': folder,
      'data.train_split': 'train', 'data.eval_split': 'val'})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='different model'):
    train_and_evaluate(other, copy)
  assert _steps(copy) == [6, 9, 12]


def test_resume_after_kill_equals_uninterrupted(tiny_pmap_run, tmp_path):
  """kill -9 after the first checkpoint, then the same command again: the
  same params and EMA as the uninterrupted run, bit for bit."""
  base, _ = tiny_pmap_run
  killed = str(tmp_path / 'killed')
  # The same tiny config through command-line overrides.
  proc = train_utils.run_train_subprocess(train_utils.tiny_args(
      killed, extra={'train.log_every_steps': 1}))
  try:
    deadline = time.time() + 900
    first = os.path.join(killed, 'checkpoints', '3')
    while not os.path.isdir(first) and proc.poll() is None:
      assert time.time() < deadline, 'no checkpoint appeared'
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  steps = _steps(killed)
  assert steps and steps[-1] < TOTAL, steps  # killed mid-run
  train_and_evaluate(train_utils.tiny_config(
      extra={'train.log_every_steps': 1}), killed)
  assert _steps(killed)[-1] == TOTAL
  for which in ('raw', 'ema'):
    a = checkpointing.restore_params(base, which)
    b = checkpointing.restore_params(killed, which)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_jit_fsdp_loop_equals_pmap_loop_and_averages_the_window(
    tiny_pmap_run, tmp_path):
  """The loop under config.parallel 'jit' + FSDP trains the same model as
  under 'pmap', and a log covers every step since the previous one."""
  pmap_dir, results_p = tiny_pmap_run
  jit_dir = str(tmp_path / 'jit')
  # The config of test_train_scale's FSDP run (one compiled step for both)
  # but logging every 3 steps.
  results_j = train_and_evaluate(train_utils.tiny_config(extra={
      'parallel.backend': 'jit', 'parallel.fsdp': True,
      'train.log_every_steps': 3}), jit_dir)
  per_step, _ = _train_records(pmap_dir)
  window, _ = _train_records(jit_dir)
  assert [r['step'] for r in per_step] == list(range(1, TOTAL + 1))
  assert [r['step'] for r in window] == list(range(3, TOTAL + 1, 3))
  for i, record in enumerate(window):
    for key in ('train/loss', 'train/top1', 'train/grad_norm'):
      np.testing.assert_allclose(
          record[key], np.mean([r[key] for r in per_step[3 * i:3 * i + 3]]),
          rtol=1e-5, err_msg=key)
  assert results_j['eval/count'] == results_p['eval/count'] == 300
  np.testing.assert_allclose(results_j['eval/loss'], results_p['eval/loss'],
                             rtol=1e-5)
  for which in ('raw', 'ema'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                         atol=1e-7),
                 checkpointing.restore_params(jit_dir, which),
                 checkpointing.restore_params(pmap_dir, which))


# Two processes on a loaded machine start and compile at different speeds:
# generous time limits, and the collectives' fast-fail timeout (conftest.py,
# for in-process fake devices) raised for the workers.
_WORKER_XLA_FLAGS = ' '.join(
    f for f in os.environ.get('XLA_FLAGS', '').split()
    if 'collective_call_terminate_timeout' not in f) + (
        ' --xla_cpu_collective_call_terminate_timeout_seconds=600')


WORKER_STEPS = 4  # multihost_worker.py's tiny_config(num_steps=4, ...)


def _worker(workdir, nproc, pid, port, ndev):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=_WORKER_XLA_FLAGS)
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'),
       workdir, str(nproc), str(pid), str(port), str(ndev)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _emulated_hosts(single_host, hosts):
  """create_train_iterator whose batches are the concatenation of what
  `hosts` hosts read (the global batches of a `hosts`-process run)."""
  def create_train_iterator(cfg, *, global_batch_size, seed, start_step=0,
                            **kwargs):
    kwargs = {k: v for k, v in kwargs.items()
              if k not in ('process_index', 'process_count')}
    its = [single_host(cfg, global_batch_size=global_batch_size, seed=seed,
                       start_step=start_step, process_index=i,
                       process_count=hosts, **kwargs) for i in range(hosts)]
    while True:
      parts = [next(it) for it in its]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return create_train_iterator


def test_two_processes_equal_one_process(tmp_path, monkeypatch):
  """2 processes x 2 devices (pmap) train the same model as this process
  reading the same global batches."""
  import socket
  from nfnets import data
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / 'multi')
  procs = [_worker(multi, 2, i, port, 2) for i in range(2)]
  try:
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  # Eval counted each of the 300 test examples once, on every process.
  assert all('EVAL 300.0' in out for out in outs), outs
  # The reference, in this process (8 devices) after the workers ended:
  # multihost_worker.py's config, the two hosts' batches concatenated.
  monkeypatch.setattr(data, 'create_train_iterator',
                      _emulated_hosts(data.create_train_iterator, 2))
  single = str(tmp_path / 'single')
  results = train_and_evaluate(
      train_utils.tiny_config(num_steps=WORKER_STEPS), single)
  assert results['eval/count'] == 300
  # Same data, same maths; only the all-reduce order differs (float32
  # round-off, ~1e-6 on leaves whose values are ~1e-7, e.g. fresh biases).
  for which in ('raw', 'ema'):
    a = checkpointing.restore_params(multi, which)
    b = checkpointing.restore_params(single, which)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                         atol=1e-5), a, b)


def test_plot_metrics(tmp_path):
  from scripts import plot_metrics
  records = [{'step': 2, 'train/loss': 2.0, 'train/top1': 0.1,
              'train/lr': 0.1},
             {'step': 4, 'train/loss': 1.0, 'train/top1': 0.5,
              'train/lr': 0.05},
             {'step': 4, 'eval/top1': 0.6, 'eval_ema/top1': 0.55}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in records))
  plot_metrics.main([str(tmp_path)])
  png = tmp_path / 'metrics.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(SystemExit, match='No metrics.jsonl'):
    plot_metrics.main([str(tmp_path / 'missing')])
