"""The training loop at the run level, under 'pmap' and 'jit' (+ FSDP):
checkpoints cross backends, kill -9 and SIGTERM resume, several processes.

All on the tiny digits config (tests/train_utils.py) over fake CPU devices.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nfnets.checkpoints import run as checkpointing
from nfnets.training.loop import train_and_evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_utils  # noqa: E402

REPO = train_utils.REPO
TOTAL = train_utils.TOTAL  # steps of the runs compared; checkpoints every 3
RESUME_AT = 6  # a checkpoint kept by every run (keep_checkpoints=3)
PMAP = {'parallel.backend': 'pmap', 'parallel.fsdp': False}
FSDP = {'parallel.backend': 'jit', 'parallel.fsdp': True}


# The suite-wide persistent compilation cache (tests/conftest.py) reaches the
# subprocesses through the environment.
CACHE_ENV = {}


def _steps(workdir):
  ckpts = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())


def _state(workdir, step=None):
  """The whole saved state (params, opt_state, ema_params, step, nonfinite)
  of a checkpoint (default: the newest), as host numpy."""
  step = _steps(workdir)[-1] if step is None else step
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with ocp.StandardCheckpointer() as ckptr:
    # Host numpy, whichever devices wrote it (see restore_params).
    state = ckptr.restore(path, checkpointing._host_target(  # pylint: disable=protected-access
        ckptr.metadata(path)))
  return jax.tree.map(np.asarray, state)


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  return [r for r in records if 'train/loss' in r]


def _assert_close(a, b, rtol, atol):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _assert_equal(a, b):
  _assert_close(a, b, rtol=0, atol=0)


@pytest.fixture(scope='module')
def uninterrupted(tiny_pmap_run, tiny_fsdp_run):
  """TOTAL steps, uninterrupted, under pmap and under jit + FSDP (the
  session's shared tiny runs, tests/conftest.py)."""
  runs = {'pmap': tiny_pmap_run[0], 'fsdp': tiny_fsdp_run[0]}
  for run in runs.values():
    assert _steps(run) == [6, 9, 12]
  return runs


def _resume_from_copy(src, step, dst, extra):
  """Copies checkpoint `step` of run `src` into a fresh workdir and trains
  it to TOTAL with `extra`'s backend."""
  shutil.copytree(os.path.join(src, 'checkpoints', str(step)),
                  os.path.join(dst, 'checkpoints', str(step)))
  train_and_evaluate(train_utils.tiny_config(TOTAL, extra=extra), dst)
  # Resumed (not restarted): only the steps after `step` were trained.
  assert [r['step'] for r in _train_records(dst)] == list(
      range(step + 2, TOTAL + 1, 2))
  return _state(dst)


def test_checkpoints_resume_across_backends(uninterrupted, tmp_path):
  """A pmap checkpoint resumed under jit + FSDP (and the reverse) ends where
  the uninterrupted runs end, params, EMA and optimizer state, to float32
  round-off (the backends reduce gradients over the devices differently:
  all-reduce vs reduce-scatter); resumed under pmap, bit for bit."""
  pmap_end = _state(uninterrupted['pmap'])
  fsdp_end = _state(uninterrupted['fsdp'])
  assert int(pmap_end['step']) == int(fsdp_end['step']) == TOTAL
  to_fsdp = _resume_from_copy(uninterrupted['pmap'], RESUME_AT,
                              str(tmp_path / 'pmap_to_fsdp'), FSDP)
  to_pmap = _resume_from_copy(uninterrupted['fsdp'], RESUME_AT,
                              str(tmp_path / 'fsdp_to_pmap'), PMAP)
  for resumed, reference in ((to_fsdp, pmap_end), (to_pmap, fsdp_end),
                             (to_fsdp, fsdp_end), (to_pmap, pmap_end)):
    assert int(resumed['step']) == TOTAL
    assert int(resumed['nonfinite']) == 0
    # atol: leaves that are ~0 (fresh biases, momentum of near-zero grads).
    _assert_close(resumed, reference, rtol=1e-5, atol=1e-6)
  # Under the same backend, resuming is bit-exact (pmap here; jit + FSDP
  # after SIGTERM and kill -9 in the next test).
  _assert_equal(_resume_from_copy(uninterrupted['pmap'], RESUME_AT,
                                  str(tmp_path / 'pmap_to_pmap'), PMAP),
                pmap_end)


def _wait_for_checkpoint_after(proc, workdir, step, timeout=400):
  deadline = time.time() + timeout
  while True:
    ckpts = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(ckpts) and any(s > step for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      pytest.fail('exited before checkpointing: ' + proc.communicate()[0][-3000:])
    assert time.time() < deadline, f'no checkpoint after step {step}'
    time.sleep(0.05)


def _sigterm(proc):
  proc.send_signal(signal.SIGTERM)
  try:
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  return out


def test_sigterm_then_kill_then_resume_is_bit_exact(uninterrupted, tmp_path):
  """`python -m nfnets.train` under jit + FSDP (async checkpoints), one
  workdir: SIGTERM saves the step it reached, says so and exits 0; the same
  command resumes from that step and is killed with -9 after its next
  checkpoint; the run then resumes to the end, bit for bit where the
  uninterrupted run ends (params, EMA, optimizer state)."""
  workdir = str(tmp_path / 'run')
  extra = dict(FSDP, **{'train.async_checkpointing': True})
  args = train_utils.tiny_args(workdir, TOTAL, extra=extra)
  proc = train_utils.run_train_subprocess(args, env_extra=CACHE_ENV)
  _wait_for_checkpoint_after(proc, workdir, 0)
  out = _sigterm(proc)
  assert 'SIGTERM: checkpointed step' in out, out[-3000:]
  assert 'Resumed from' not in out
  stopped = int(out.split('SIGTERM: checkpointed step ')[1].split(';')[0])
  assert 3 <= stopped < TOTAL and _steps(workdir)[-1] == stopped
  assert int(_state(workdir)['step']) == stopped
  # Train metrics every 2 steps, up to the stop, none logged twice.
  logged = [r['step'] for r in _train_records(workdir)]
  assert logged == list(range(2, logged[-1] + 1, 2)), logged
  assert logged[-1] <= stopped

  proc = train_utils.run_train_subprocess(args, env_extra=CACHE_ENV)
  try:
    _wait_for_checkpoint_after(proc, workdir, stopped)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert (f'Resumed from {os.path.join(workdir, "checkpoints")} at step '
          f'{stopped}.') in out, out[-3000:]
  assert stopped < _steps(workdir)[-1] < TOTAL  # killed mid-run

  train_and_evaluate(train_utils.tiny_config(TOTAL, extra=extra), workdir)
  assert _steps(workdir)[-1] == TOTAL
  _assert_equal(_state(workdir), _state(uninterrupted['fsdp']))


def _worker(workdir, nproc, pid, port, ndev, emulate, backend):
  env = dict(os.environ, PYTHONPATH=REPO, **CACHE_ENV)
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'),
       workdir, str(nproc), str(pid), str(port), str(ndev), str(emulate),
       backend],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_equal_one_process(tmp_path):
  """2 processes x 2 devices train the same model as 1 process x 4 devices
  reading the same global batches, under pmap and under jit + FSDP (the
  state sharded across both processes, each writing its shards of the
  checkpoint). One worker trio runs both backends (one start-up)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  procs = [_worker(multi, 2, i, port, 2, 0, 'pmap,fsdp') for i in range(2)]
  procs.append(_worker(single, 1, 0, 0, 4, 2, 'pmap,fsdp'))
  try:
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert 'BACKEND pmap Pmap replicated' in out, out[-3000:]
    assert 'BACKEND fsdp Jit fsdp' in out, out[-3000:]
    # Eval counted each of the 300 test examples once, on every process.
    assert 'EVAL pmap 300.0' in out and 'EVAL fsdp 300.0' in out, out[-3000:]
  for backend in ('pmap', 'fsdp'):
    a = _state(os.path.join(multi, backend))
    b = _state(os.path.join(single, backend))
    assert int(a['step']) == int(b['step']) == 4
    # Same data, same maths; only the all-reduce order differs (float32
    # round-off, ~1e-6 on leaves whose values are ~1e-7, e.g. fresh biases).
    _assert_close(a, b, rtol=1e-4, atol=1e-5)
  # restore_params reads the checkpoint sharded over devices of 2 processes
  # (devices this process does not have) as host numpy.
  fsdp_multi = os.path.join(multi, 'fsdp')
  for which in ('raw', 'ema'):
    _assert_equal(checkpointing.restore_params(fsdp_multi, which),
                  _state(fsdp_multi)['params' if which == 'raw'
                                     else 'ema_params'])
