"""The console of `python -m nfnets.train` (a short demo run): our progress
lines, no library INFO chatter; an unreadable checkpoint is one clear error."""
import glob
import os
import sys

import background
import train_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *overrides):
  # One device, as a user's first run has; the suite's compile-time flags
  # (tests/conftest.py) kept.
  xla_flags = ' '.join(f for f in background.env()['XLA_FLAGS'].split()
                       if 'device_count' not in f and 'collective' not in f)
  env = {k: v for k, v in background.env(XLA_FLAGS=xla_flags,
                                         PYTHONPATH=REPO).items()
         if k != 'TF_CPP_MIN_LOG_LEVEL'}
  # The demo narrowed to the suite's tiny model and size (the console is
  # the same; compiling and training cost less).
  tiny = [f'--config.{k}={v}' for k, v in train_utils.TINY_OVERRIDES.items()
          if k.startswith(('model.', 'data.'))]
  cmd = [sys.executable, '-m', 'nfnets.train', '--config=configs/demo.py',
         f'--workdir={workdir}', *tiny, '--config.train.num_steps=30',
         '--config.train.log_every_steps=10',
         '--config.train.checkpoint_every_steps=10', *overrides]
  return background.run(cmd, timeout=900, cwd=REPO, env=env)


@background.job
def demo(tmp):
  """The demo run (workdir, run), then the same command for 40 steps after
  its checkpoints' files were cut in half (run)."""
  first = _train(tmp)
  files = glob.glob(str(tmp / 'checkpoints' / '*' / 'state' /
                        'ocdbt.process_*' / 'd' / '*'))
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  second = _train(tmp, '--config.train.num_steps=40') if files else None
  return tmp, first, files, second


def test_demo_console_shows_our_lines_only(demo):
  run = demo[1]
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
  workdir, first, files, run = demo
  assert first.returncode == 0
  assert files
  out = run.stdout + run.stderr
  assert run.returncode == 2, out[-5000:]
  assert 'error: None of the checkpoints under' in run.stderr, out
  assert str(workdir / 'checkpoints') in out and 'move' in out
  assert 'Traceback' not in out and 'Event loop is closed' not in out, out
  assert len(out.splitlines()) < 15, out
  assert not (workdir / 'checkpoints_corrupt').exists()
