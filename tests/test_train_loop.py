"""The experiment loop end to end on the embedded digits (tiny model)."""
import glob
import importlib.util
import json
import os
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


def test_train_eval_logs_and_mismatch(tmp_path):
  workdir = str(tmp_path / 'run')
  results = train_and_evaluate(train_utils.tiny_config(num_steps=4), workdir)
  # Every one of the 300 test digits counted exactly once (64-example eval
  # batches over 8 devices: the last batch is padded and masked).
  assert results['eval/count'] == 300 and results['eval_ema/count'] == 300
  assert 0 <= results['eval/top1'] <= results['eval/top5'] <= 1
  records = [json.loads(l) for l in open(os.path.join(workdir,
                                                      'metrics.jsonl'))]
  train = [r for r in records if 'train/loss' in r]
  evals = [r for r in records if 'eval/top1' in r]
  assert [r['step'] for r in train] == [2, 4]
  for key in ('train/loss', 'train/top1', 'train/lr', 'train/throughput',
              'train/grad_norm'):
    assert all(np.isfinite(r[key]) for r in train), key
  assert evals and {'eval/top5', 'eval_ema/top1'} <= set(evals[-1])
  assert json.load(open(os.path.join(workdir, 'config.json')))['model'][
      'name'] == 'F0'
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4']
  assert glob.glob(os.path.join(workdir, 'tb', '*'))
  # The same workdir with another model fails clearly, and keeps the
  # checkpoints.
  other = train_utils.tiny_config(num_steps=6)
  other.unlock()
  other.model.kwargs.width = 0.125
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='different model'):
    train_and_evaluate(other, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4']


def test_resume_after_kill_equals_uninterrupted(tmp_path):
  total = 9
  base = str(tmp_path / 'uninterrupted')
  train_and_evaluate(train_utils.tiny_config(num_steps=total), base)

  killed = str(tmp_path / 'killed')
  # The same tiny config through command-line overrides.
  args = ['--config=configs/demo.py', f'--workdir={killed}']
  args += [f'--config.{k}={v}'
           for k, v in train_utils.tiny_overrides(num_steps=total).items()]
  proc = train_utils.run_train_subprocess(args)
  deadline = time.time() + 400
  first = os.path.join(killed, 'checkpoints', '3')
  while not os.path.isdir(first) and proc.poll() is None:
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  assert proc.returncode == -signal.SIGKILL, out
  steps = sorted(int(s) for s in os.listdir(os.path.join(killed,
                                                         'checkpoints'))
                 if s.isdigit())
  assert steps and steps[-1] < total, steps  # killed mid-run
  train_and_evaluate(train_utils.tiny_config(num_steps=total), killed)

  for which in ('raw', 'ema'):
    a = checkpointing.restore_params(base, which)
    b = checkpointing.restore_params(killed, which)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_jit_fsdp_loop_equals_pmap_loop_and_averages_the_window(tmp_path):
  """The loop under config.parallel 'jit' + FSDP trains the same model as
  under 'pmap', and a log covers every step since the previous one."""
  def run(name, backend, log_every):
    config = train_utils.tiny_config(num_steps=3)
    with config.unlocked():
      config.parallel.backend = backend
      config.parallel.fsdp = backend == 'jit'
      config.train.log_every_steps = log_every
      config.train.checkpoint_every_steps = 0
    workdir = str(tmp_path / name)
    results = train_and_evaluate(config, workdir)
    records = [json.loads(l) for l in open(os.path.join(workdir,
                                                        'metrics.jsonl'))]
    return results, workdir, [r for r in records if 'train/loss' in r]

  results_p, pmap_dir, per_step = run('pmap', 'pmap', 1)
  results_j, jit_dir, window = run('jit', 'jit', 3)
  assert [r['step'] for r in per_step] == [1, 2, 3]
  assert [r['step'] for r in window] == [3]
  for key in ('train/loss', 'train/top1', 'train/grad_norm'):
    np.testing.assert_allclose(
        window[0][key], np.mean([r[key] for r in per_step]), rtol=1e-5)
  assert results_j['eval/count'] == results_p['eval/count'] == 300
  np.testing.assert_allclose(results_j['eval/loss'], results_p['eval/loss'],
                             rtol=1e-5)
  for which in ('raw', 'ema'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                         atol=1e-7),
                 checkpointing.restore_params(jit_dir, which),
                 checkpointing.restore_params(pmap_dir, which))


def _worker(workdir, nproc, pid, port, ndev, emulate=0):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'),
       workdir, str(nproc), str(pid), str(port), str(ndev), str(emulate)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_equal_one_process(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / 'multi')
  single = str(tmp_path / 'single')
  procs = [_worker(multi, 2, i, port, 2) for i in range(2)]
  # The single process reads the same global batches as the two hosts.
  procs.append(_worker(single, 1, 0, 0, 4, emulate=2))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  # Eval counted each of the 300 test examples once, on every process.
  assert all('EVAL 300.0' in out for out in outs), outs
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
