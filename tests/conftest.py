"""Test set-up: 8 fake CPU devices (set before jax is imported) and fast-failing
collectives, so a multi-device hang fails in seconds instead of deadlocking."""
import os

_FLAGS = ('--xla_force_host_platform_device_count=8 '
          '--xla_cpu_collective_call_terminate_timeout_seconds=10 '
          # The tests run tiny models: compiling is most of their time.
          # Without XLA:CPU's optimisation passes and with its older (not
          # MLIR) fusion emitters a tiny train step compiles ~3x faster.
          '--xla_backend_optimization_level=0 '
          '--xla_cpu_use_fusion_emitters=false')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAGS).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# One persistent XLA compilation cache for the whole session, in this process
# and (through the environment) in the training subprocesses: the tests
# compile the same tiny steps again and again, and compilation is most of a
# tiny run. A cached executable is the one a fresh compilation produces.
# An explicit JAX_COMPILATION_CACHE_DIR in the environment wins.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _CACHE = tempfile.mkdtemp(prefix='nfnets_test_xla_cache_')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope='session')
def tiny_pmap_run(tmp_path_factory):
  """(workdir, results) of the tiny digits config (tests/train_utils.py) run
  for train_utils.TOTAL steps under pmap, logging every step, checkpoints at
  6, 9, 12. One run shared by the loop and fine-tuning tests; read-only."""
  import train_utils  # pylint: disable=g-import-not-at-top
  from nfnets.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_pmap_run'))
  config = train_utils.tiny_config(extra={'train.log_every_steps': 1})
  return workdir, train_and_evaluate(config, workdir)


@pytest.fixture(scope='session')
def tiny_fsdp_run(tmp_path_factory):
  """(workdir, results) of the same config as tiny_pmap_run under the 'jit'
  backend with FSDP, logging every 3 steps. Shared by the loop tests and
  test_train_scale's resume tests; read-only."""
  import train_utils  # pylint: disable=g-import-not-at-top
  from nfnets.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_fsdp_run'))
  config = train_utils.tiny_config(extra={
      'parallel.backend': 'jit', 'parallel.fsdp': True,
      'train.log_every_steps': 3})
  return workdir, train_and_evaluate(config, workdir)
