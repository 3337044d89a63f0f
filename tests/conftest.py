"""Test set-up: 8 fake CPU devices (set before jax is imported) and fast-failing
collectives, so a multi-device hang fails in seconds instead of deadlocking."""
import os

_FLAGS = ('--xla_force_host_platform_device_count=8 '
          '--xla_cpu_collective_call_terminate_timeout_seconds=10')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAGS).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
