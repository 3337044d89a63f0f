"""The training loop at the run level, under 'pmap' and 'jit' (+ FSDP):
checkpoints cross backends, kill -9 and SIGTERM resume, several processes.

All on the tiny digits config (tests/train_utils.py) over fake CPU devices.
"""
import json
import os
import shutil
import signal
import socket
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nfnets.checkpoints import run as checkpointing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import background  # noqa: E402
import train_utils  # noqa: E402

REPO = train_utils.REPO
TOTAL = train_utils.TOTAL  # steps of the runs compared; checkpoints every 3
FSDP = train_utils.FSDP


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


def test_checkpoints_resume_across_backends(uninterrupted, tiny_runs):
  """A pmap checkpoint resumed under jit + FSDP (and the reverse) ends where
  the uninterrupted runs end, params, EMA and optimizer state, to float32
  round-off (the backends reduce gradients over the devices differently:
  all-reduce vs reduce-scatter); resumed under pmap, bit for bit."""
  pmap_end = _state(uninterrupted['pmap'])
  fsdp_end = _state(uninterrupted['fsdp'])
  assert int(pmap_end['step']) == int(fsdp_end['step']) == TOTAL
  resumed = {}
  for name in train_utils.RESUMES:
    workdir = tiny_runs[name][0]
    # Resumed (not restarted): only the steps after RESUMED_AT were trained.
    assert [r['step'] for r in _train_records(workdir)] == list(
        range(train_utils.RESUMED_AT + 2, TOTAL + 1, 2)), name
    resumed[name] = _state(workdir)
  for name, reference in (('pmap_to_fsdp', pmap_end),
                          ('fsdp_to_pmap', fsdp_end),
                          ('pmap_to_fsdp', fsdp_end),
                          ('fsdp_to_pmap', pmap_end)):
    assert int(resumed[name]['step']) == TOTAL
    assert int(resumed[name]['nonfinite']) == 0
    # atol: leaves that are ~0 (fresh biases, momentum of near-zero grads).
    _assert_close(resumed[name], reference, rtol=1e-5, atol=1e-6)
  # Under the same backend, resuming is bit-exact (pmap here; jit + FSDP
  # after SIGTERM and kill -9 in the next test).
  _assert_equal(resumed['pmap_to_pmap'], pmap_end)


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


SIGTERM_EXTRA = dict(FSDP, **{'train.async_checkpointing': True})


@background.job
def sigterm_then_kill(tmp):
  """`python -m nfnets.train` under jit + FSDP (async checkpoints) in one
  workdir: SIGTERMed after its first checkpoint, then the same command
  killed with -9 after its next one, then the same command to the end.
  Returns the workdir, a copy of it after the SIGTERM, the checkpointed
  steps after the kill, and the first two runs' exit status and output."""
  workdir = str(tmp / 'run')
  proc = train_utils.train_process(workdir, TOTAL, extra=SIGTERM_EXTRA)
  _wait_for_checkpoint_after(proc, workdir, 0)
  stopped_out = _sigterm(proc)
  after_sigterm = str(tmp / 'after_sigterm')
  shutil.copytree(workdir, after_sigterm)
  stopped = _steps(workdir)[-1]
  # On a loaded machine the run can reach its end before the kill lands
  # (two async checkpoints 3 steps apart): then the same command is killed
  # again from the SIGTERMed workdir.
  for _ in range(3):
    shutil.rmtree(workdir)
    shutil.copytree(after_sigterm, workdir)
    proc = train_utils.train_process(workdir, TOTAL, extra=SIGTERM_EXTRA)
    try:
      _wait_for_checkpoint_after(proc, workdir, stopped)
      proc.send_signal(signal.SIGKILL)
      killed_out, _ = proc.communicate(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
    after_kill = _steps(workdir)
    if after_kill[-1] < TOTAL:
      break
  train_utils.train_command(workdir, TOTAL, extra=SIGTERM_EXTRA)
  return dict(workdir=workdir, after_sigterm=after_sigterm,
              after_kill=after_kill, stopped_out=stopped_out,
              killed_status=proc.returncode, killed_out=killed_out)


def test_sigterm_then_kill_then_resume_is_bit_exact(uninterrupted,
                                                    sigterm_then_kill):
  """SIGTERM saves the step the run reached, says so and exits 0; the same
  command resumes from that step (and is killed with -9 after its next
  checkpoint); the run then resumes to the end, bit for bit where the
  uninterrupted run ends (params, EMA, optimizer state)."""
  run = sigterm_then_kill
  out = run['stopped_out']
  assert 'SIGTERM: checkpointed step' in out, out[-3000:]
  assert 'Resumed from' not in out
  stopped = int(out.split('SIGTERM: checkpointed step ')[1].split(';')[0])
  assert 3 <= stopped < TOTAL and _steps(run['after_sigterm'])[-1] == stopped
  assert int(_state(run['after_sigterm'])['step']) == stopped
  # Train metrics every 2 steps, up to the stop, none logged twice.
  logged = [r['step'] for r in _train_records(run['after_sigterm'])]
  assert logged == list(range(2, logged[-1] + 1, 2)), logged
  assert logged[-1] <= stopped

  out = run['killed_out']
  assert run['killed_status'] == -signal.SIGKILL, out[-3000:]
  assert (f'Resumed from {os.path.join(run["workdir"], "checkpoints")} at '
          f'step {stopped}.') in out, out[-3000:]
  assert stopped < run['after_kill'][-1] < TOTAL  # killed mid-run

  assert _steps(run['workdir'])[-1] == TOTAL
  _assert_equal(_state(run['workdir']), _state(uninterrupted['fsdp']))


def _worker(workdir, nproc, pid, port, ndev, backend):
  return background.popen(
      [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'),
       workdir, str(nproc), str(pid), str(port), str(ndev), backend],
      env=background.env(PYTHONPATH=REPO))


@background.job
def worker_pair(tmp):
  """(workdir, [(worker, its output)]): 2 processes x 4 devices train the
  shared runs' config into workdir, under pmap then jit + FSDP (one
  start-up)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = str(tmp / 'multi')
  ndev = 8 // train_utils.HOSTS  # the shared runs' 8 devices, split
  procs = [_worker(workdir, train_utils.HOSTS, i, port, ndev, 'pmap,fsdp')
           for i in range(train_utils.HOSTS)]
  try:
    outs = [p.communicate(timeout=1200)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return workdir, list(zip(procs, outs))


def test_two_processes_equal_one_process(worker_pair, tiny_runs):
  """2 processes x 4 devices, under pmap and under jit + FSDP (the state
  sharded across both processes, each writing its shards of the
  checkpoint), train the same model as 1 process x 8 devices reading the
  same global batches (the shared run 'hosts' of the same config,
  tests/conftest.py)."""
  multi, runs = worker_pair
  for p, out in runs:
    assert p.returncode == 0, out[-3000:]
    assert 'BACKEND pmap Pmap replicated' in out, out[-3000:]
    assert 'BACKEND fsdp Jit fsdp' in out, out[-3000:]
    # Eval counted each of the 300 test examples once, on every process.
    assert 'EVAL pmap 300.0' in out and 'EVAL fsdp 300.0' in out, out[-3000:]
  single = _state(tiny_runs['hosts'][0])
  for backend in ('pmap', 'fsdp'):
    multi_state = _state(os.path.join(multi, backend))
    assert int(multi_state['step']) == int(single['step']) == TOTAL
    # Same data, same maths; only the order of the gradient reductions
    # differs (float32 round-off, ~1e-6 on leaves whose values are ~1e-7,
    # e.g. fresh biases).
    _assert_close(multi_state, single, rtol=1e-4, atol=1e-5)
  # restore_params reads the checkpoint sharded over devices of 2 processes
  # (devices this process does not have) as host numpy.
  fsdp_multi = os.path.join(multi, 'fsdp')
  for which in ('raw', 'ema'):
    _assert_equal(checkpointing.restore_params(fsdp_multi, which),
                  _state(fsdp_multi)['params' if which == 'raw'
                                     else 'ema_params'])
