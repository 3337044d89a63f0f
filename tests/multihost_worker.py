"""One process of a multi-process CPU training run (test_train_scale).

  python tests/multihost_worker.py WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES [BACKENDS]

Trains train_utils.tiny_config() (TOTAL steps, the shared runs' config of
tests/conftest.py, checkpoints every 6 steps) with DEVICES devices per
process. BACKENDS: comma-separated, each trained in turn into
WORKDIR/BACKEND, in one process (one distributed start-up for all): 'pmap'
(default), 'jit', or 'fsdp' (jit with the state sharded over the devices of
all processes).
"""
import os
import sys

# The device count comes from DEVICES; collectives wait generously (a
# process of a loaded machine can reach a collective long after its peer).
os.environ['XLA_FLAGS'] = ' '.join(
    [f for f in os.environ.get('XLA_FLAGS', '').split()
     if 'device_count' not in f and 'collective' not in f] +
    ['--xla_cpu_collective_timeout_seconds=300',
     '--xla_cpu_collective_call_terminate_timeout_seconds=300'])

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_utils  # noqa: E402


def _config(backend):
  config = train_utils.tiny_config(
      extra={'train.checkpoint_every_steps': 6})
  config.unlock()
  config.parallel.backend = 'pmap' if backend == 'pmap' else 'jit'
  config.parallel.fsdp = backend == 'fsdp'
  config.distributed.initialize = 'never'  # done in main()
  config.lock()
  return config


def main():
  workdir, nproc, pid, port, ndev = sys.argv[1:6]
  backends = (sys.argv[6] if len(sys.argv) > 6 else 'pmap').split(',')
  jax.config.update('jax_num_cpu_devices', int(ndev))
  if int(nproc) > 1:
    # Initialised here with generous timeouts (a slow process start), then
    # one tiny collective while the processes are in step (initialize
    # returns when all have connected): gloo's connections are made before
    # the first training step, whose compilation time differs per process.
    jax.distributed.initialize(f'127.0.0.1:{port}', int(nproc), int(pid),
                               initialization_timeout=600,
                               heartbeat_timeout_seconds=300)
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('multihost_worker_start')
  from nfnets.training import parallel
  from nfnets.training.loop import train_and_evaluate
  for backend in backends:
    config = _config(backend)
    results = train_and_evaluate(config, os.path.join(workdir, backend))
    assert jax.process_count() == int(nproc), jax.process_count()
    assert jax.device_count() == int(nproc) * int(ndev)
    print('BACKEND', backend, type(parallel.make(config.parallel)).__name__,
          'fsdp' if config.parallel.fsdp else 'replicated')
    print('EVAL', backend, results.get('eval/count'))


if __name__ == '__main__':
  main()
