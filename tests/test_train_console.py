"""The console of `python -m nfnets.train` (a short demo run): our progress
lines, no library INFO chatter; an unreadable checkpoint is one clear error."""
import glob
import os
import subprocess
import sys

import pytest

import train_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *overrides):
  # One device, as a user's first run has; the suite's compile-time flags
  # (tests/conftest.py) kept.
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'XLA_FLAGS')}
  env['XLA_FLAGS'] = ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if 'device_count' not in f and 'collective' not in f)
  env['PYTHONPATH'] = REPO
  # The demo narrowed to the suite's tiny model and size (the console is
  # the same; compiling and training cost less).
  tiny = [f'--config.{k}={v}' for k, v in train_utils.TINY_OVERRIDES.items()
          if k.startswith(('model.', 'data.'))]
  cmd = [sys.executable, '-m', 'nfnets.train', '--config=configs/demo.py',
         f'--workdir={workdir}', *tiny, '--config.train.num_steps=30',
         '--config.train.log_every_steps=10',
         '--config.train.checkpoint_every_steps=10', *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('demo')
  return workdir, _train(workdir)


def test_demo_console_shows_our_lines_only(demo):
  _, run = demo
  out = run.stdout + run.stderr
  assert run.returncode == 0, out[-5000:]
  lines = out.splitlines()
  assert any('[10/30] loss' in l for l in lines), out
  assert any('[30/30] loss' in l for l in lines), out
  assert any('eval top1' in l for l in lines), out
  assert not [l for l in lines if 'orbax' in l or 'checkpoint_manager' in l
              or 'async_checkpointer' in l], out
  assert not [l for l in lines if 'oneDNN' in l or 'dataset_info.py' in l
              or 'xla_bridge' in l], out
  assert len(lines) < 30, out


def test_unreadable_checkpoints_give_one_clear_error(demo):
  workdir, first = demo
  assert first.returncode == 0
  files = glob.glob(str(workdir / 'checkpoints' / '*' / 'state' /
                        'ocdbt.process_*' / 'd' / '*'))
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  run = _train(workdir, '--config.train.num_steps=40')
  out = run.stdout + run.stderr
  assert run.returncode == 2, out[-5000:]
  assert 'error: None of the checkpoints under' in run.stderr, out
  assert str(workdir / 'checkpoints') in out and 'move' in out
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out
  assert len(out.splitlines()) < 15, out
  assert not (workdir / 'checkpoints_corrupt').exists()
