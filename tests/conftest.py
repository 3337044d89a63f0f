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
# Nothing here uses Keras, yet `import tensorflow` imports Keras 3's
# optimizers eagerly (~2 CPU-s in each of the suite's ~30 processes). Asked
# for the legacy tf_keras instead, which the package does not install,
# TensorFlow skips that import (tf.keras alone would then fail; nothing
# touches it).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

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


import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402  (after the environment above)

import background  # noqa: E402  (snapshots the environment above)
import train_utils  # noqa: E402


# Subprocess-heavy runs work in the background while in-process tests run
# (tests/background.py).
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
  background.reorder(items)


def pytest_collection_finish(session):
  if not session.config.option.collectonly:
    background.start(session.items)


def pytest_terminal_summary(terminalreporter):
  line = background.summary()
  if line:
    terminalreporter.write_line(line)


def pytest_sessionfinish():
  background.close()
  # pytest's unraisable-exception check ends the session with five full
  # garbage collections, seconds each over the heap the suite leaves. One
  # collection here still finalises what the tests left (pytest reports any
  # error raised on the way); the survivors are then frozen out of the rest.
  gc.collect()
  gc.freeze()


# The shared tiny runs (train_utils.RESUMES), read-only.
@background.job
def tiny_runs(tmp):
  """{name: (workdir, final eval results)}: TOTAL steps of train_utils'
  config under pmap ('pmap', logging every step) and under jit + FSDP
  ('fsdp', every 3 steps), checkpoints at 6, 9, 12; then the resumes of
  train_utils.RESUMES; then 'hosts', under pmap on the global batches of
  train_utils.HOSTS hosts. Trained in turn in one process
  (tests/train_runs_worker.py), whose later runs reuse the compiled steps."""
  runs = [dict(name='pmap', extra=dict(train_utils.PMAP,
                                       **{'train.log_every_steps': 1})),
          dict(name='fsdp', extra=dict(train_utils.FSDP,
                                       **{'train.log_every_steps': 3}))]
  for name, (src, extra) in train_utils.RESUMES.items():
    runs.append(dict(name=name, extra=extra, resume_from=str(
        tmp / src / 'checkpoints' / str(train_utils.RESUMED_AT))))
  runs.append(dict(name='hosts', extra=train_utils.PMAP,
                   hosts=train_utils.HOSTS))
  for run in runs:
    run['workdir'] = str(tmp / run['name'])
  with open(tmp / 'runs.json', 'w') as f:
    json.dump(runs, f)
  out = background.run(
      [sys.executable, os.path.join(train_utils.REPO, 'tests',
                                    'train_runs_worker.py'),
       str(tmp / 'runs.json')], timeout=1800,
      env=background.env(PYTHONPATH=train_utils.REPO))
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  return {run['name']: (run['workdir'], train_utils.final_eval(run['workdir']))
          for run in runs}


@pytest.fixture(scope='session')
def tiny_pmap_run(tiny_runs):
  """(workdir, final eval results) of the shared run under pmap."""
  return tiny_runs['pmap']


@pytest.fixture(scope='session')
def tiny_fsdp_run(tiny_runs):
  """(workdir, final eval results) of the shared run under jit + FSDP."""
  return tiny_runs['fsdp']
