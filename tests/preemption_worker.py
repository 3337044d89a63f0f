"""One process of a tiny multi-process run for the preemption test.

  python tests/preemption_worker.py WORKDIR NUM_PROCESSES PROCESS_ID PORT

Each process has 2 CPU devices; the state (numbers only, no model) is sharded
over all devices of all processes and updated by a jitted step. The loop makes
exactly the calls the training loop must make: after every step
`watcher.should_stop(step)` on every process, then save + close + exit.
Prints 'SAVED <step>' after the checkpoint is written.
"""
import os
import sys
import time

if __name__ == '__main__':  # not when the test imports expected_state
  os.environ['XLA_FLAGS'] = ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if 'device_count' not in f)

import jax  # noqa: E402
import numpy as np  # noqa: E402

MAX_STEPS = 3000


def initial_state():
  """Host values of the state at step 0 (the test recomputes them)."""
  w = np.arange(24, dtype=np.float32).reshape(8, 3)
  return {'params': {'w': w}, 'opt_state': {'m': np.zeros((8, 3), np.float32)},
          'ema_params': {'w': w.copy()}, 'step': np.int32(0),
          'nonfinite': np.int32(0)}


def expected_state(step: int):
  """Host values after `step` steps of `_step` (closed form)."""
  s = initial_state()
  return {'params': {'w': s['params']['w'] + step},
          'opt_state': {'m': np.full((8, 3), 2.0 * step, np.float32)},
          'ema_params': {'w': s['ema_params']['w'] + 0.5 * step},
          'step': np.int32(step), 'nonfinite': np.int32(0)}


def _step(state):
  return {'params': {'w': state['params']['w'] + 1},
          'opt_state': {'m': state['opt_state']['m'] + 2},
          'ema_params': {'w': state['ema_params']['w'] + 0.5},
          'step': state['step'] + 1, 'nonfinite': state['nonfinite']}


def main():
  workdir, nproc, pid, port = sys.argv[1:5]
  jax.config.update('jax_num_cpu_devices', 2)
  jax.distributed.initialize(f'127.0.0.1:{port}', int(nproc), int(pid))
  from nfnets.checkpoints import PreemptionWatcher, RunCheckpointer
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('batch',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = {'params': {'w': rows}, 'opt_state': {'m': rows},
               'ema_params': {'w': repl}, 'step': repl, 'nonfinite': repl}
  host = initial_state()
  state = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(
          np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]),
      host, shardings)
  step_fn = jax.jit(_step, out_shardings=shardings, donate_argnums=0)
  ckpt = RunCheckpointer(workdir, async_save=True)
  watcher = PreemptionWatcher(multihost=True)
  meta = {'model': 'toy', 'num_classes': 0}
  step = 0
  while step < MAX_STEPS:
    state = step_fn(state)
    step += 1
    if step == 3:
      open(os.path.join(workdir, f'ready_{pid}'), 'w').close()
    if watcher.should_stop(step):
      ckpt.save(step, state, meta)
      ckpt.close()
      print('SAVED', step, flush=True)
      return 0
    time.sleep(0.01)
  print('NOT STOPPED', flush=True)
  return 3


if __name__ == '__main__':
  sys.exit(main())
