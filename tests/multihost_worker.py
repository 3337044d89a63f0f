"""One process of a multi-process CPU training run (used by test_train_loop).

  python tests/multihost_worker.py WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES
"""
import os
import sys

os.environ['XLA_FLAGS'] = ' '.join(
    f for f in os.environ.get('XLA_FLAGS', '').split()
    if 'device_count' not in f)

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_utils  # noqa: E402


def main():
  workdir, nproc, pid, port, ndev = sys.argv[1:6]
  jax.config.update('jax_num_cpu_devices', int(ndev))
  config = train_utils.tiny_config(num_steps=4, batch_size=16)
  config.unlock()
  if int(nproc) > 1:
    config.distributed.initialize = 'always'
    config.distributed.coordinator_address = f'127.0.0.1:{port}'
    config.distributed.num_processes = int(nproc)
    config.distributed.process_id = int(pid)
  config.lock()
  from nfnets.training.loop import train_and_evaluate
  results = train_and_evaluate(config, workdir)
  assert jax.process_count() == int(nproc), jax.process_count()
  assert jax.device_count() == int(nproc) * int(ndev)
  print('EVAL', results.get('eval/count'))


if __name__ == '__main__':
  main()
