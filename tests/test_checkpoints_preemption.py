"""Preemption: SIGTERM on ONE of two processes makes both save the same step
and exit 0; the checkpoint (sharded over 4 devices of 2 processes) restores
into other layouts. Plus the single-process SIGTERM flag."""
import os
import signal
import socket
import sys
import time

import jax
import numpy as np
import pytest

from nfnets.checkpoints import PreemptionWatcher, RunCheckpointer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import background  # noqa: E402  pylint: disable=g-import-not-at-top
import preemption_worker  # noqa: E402  pylint: disable=g-import-not-at-top


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_single_process_sigterm_sets_flag():
  watcher = PreemptionWatcher(multihost=False)
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert watcher.should_stop(2)
    assert watcher.requested and watcher.stop_step == 2
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) is not watcher._handle  # pylint: disable=protected-access


def test_multihost_requires_distributed():
  with pytest.raises(RuntimeError, match='jax.distributed.initialize'):
    PreemptionWatcher(multihost=True)


@background.job
def preempted_pair(tmp):
  """(workdir, [(worker, output)]): two processes training a toy state, the
  second SIGTERMed once both are ready."""
  port = _free_port()
  # Generous limits: on a loaded machine a process may take minutes to
  # start, and one may reach a collective long before the other.
  flags = [f for f in background.env()['XLA_FLAGS'].split()
           if 'collective_call_terminate_timeout' not in f]
  env = background.env(
      PYTHONPATH=os.path.dirname(HERE), TF_CPP_MIN_LOG_LEVEL='3',
      XLA_FLAGS=' '.join(flags + [
          '--xla_cpu_collective_call_terminate_timeout_seconds=600']))
  procs = [background.popen(
      [sys.executable, os.path.join(HERE, 'preemption_worker.py'), str(tmp),
       '2', str(i), str(port)], env=env) for i in range(2)]
  try:
    deadline = time.time() + 900
    while not all((tmp / f'ready_{i}').exists() for i in range(2)):
      assert time.time() < deadline, 'workers did not start'
      assert all(p.poll() is None for p in procs), [
          p.communicate()[0][-3000:] for p in procs]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is preempted
    outs = [p.communicate(timeout=600)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return tmp, list(zip(procs, outs))


def test_sigterm_on_one_host_stops_both_at_same_step(preempted_pair):
  tmp_path, runs = preempted_pair
  for p, out in runs:
    assert p.returncode == 0, out[-3000:]
  outs = [out for _, out in runs]
  saved = [[int(l.split()[1]) for l in out.splitlines()
            if l.startswith('SAVED ')] for out in outs]
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  step = saved[0][0]
  assert step < preemption_worker.MAX_STEPS

  # The sharded (4 devices, 2 hosts) checkpoint restores into host numpy and
  # into a different sharding over this process's 8 devices.
  ckpt = RunCheckpointer(str(tmp_path), async_save=False)
  assert ckpt.all_steps() == [step]
  expected = preemption_worker.expected_state(step)
  meta = {'model': 'toy', 'num_classes': 0}
  host = ckpt.restore(preemption_worker.initial_state(), meta)
  _assert_tree_equal(host, expected)
  assert isinstance(host['params']['w'], np.ndarray)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  cols = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('x'))
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                     sharding=cols if np.ndim(x) else
                                     jax.sharding.NamedSharding(
                                         mesh, jax.sharding.PartitionSpec())),
      preemption_worker.initial_state())
  sharded = ckpt.restore(target, meta)
  ckpt.close()
  assert sharded['params']['w'].sharding == cols
  _assert_tree_equal(sharded, expected)
