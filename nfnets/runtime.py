"""Host settings that make XLA:CPU training fast; applied before JAX starts.

Every XLA:CPU execution allocates its temporaries (gigabytes for a training
step) with one ``posix_memalign``. Left alone, glibc serves a request that
large by ``mmap`` and gives it back with ``munmap``, so every step faults in
fresh zeroed pages and every first write to a temporary runs at page-fault
speed. Two settings fix it:

* ``mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)``: glibc never maps or trims,
  so freed memory is kept and reused (what tcmalloc does by default).
* synchronous CPU dispatch (``jax_cpu_enable_async_dispatch=False``): the
  executable then runs on the calling (main) thread, whose malloc arena is
  the main heap, the only one that can hold a block of that size without
  ``mmap`` (glibc's per-thread arenas are limited to 64 MiB heaps). XLA's
  worker threads keep their own arenas, so they rarely contend for a lock.

The measurements behind this (faults per step, step and compile times
before and after) are in docs/benchmarking.md. Costs: the process keeps its
peak heap instead of returning freed memory to the OS, and a call to a
compiled function returns when its result is ready (the host cannot queue
the next step meanwhile; on a CPU backend the host and the step share the
same cores anyway).

Both must be in place before XLA's threads first allocate, so entry points
call :func:`configure_cpu_runtime` before JAX starts its backend
(``python -m nfnets.train``, ``scripts/benchmark.py``, ``scripts/eval.py``).
In your own script: ``from nfnets import runtime;
runtime.configure_cpu_runtime()`` before the first JAX computation. The
malloc half from outside (e.g. for another process): the environment
variables in :data:`MALLOC_ENV`.

Nothing is changed when an accelerator plugin is installed or JAX_PLATFORMS
names another platform first (device memory is not host malloc), when the
backend is already running, or when ``NFNETS_CPU_TUNING=0``; the malloc
half is skipped on non-glibc systems.

Entry points also call :func:`keep_tensorflow_off_accelerators`, which
imports TensorFlow (the input pipeline's) without its native start-up
notices (:func:`native_info_hidden`).
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import sys
import tempfile
from typing import Dict

ENV_SWITCH = 'NFNETS_CPU_TUNING'
# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# The same malloc setting as glibc environment variables (read at process
# start), e.g. to give a comparison process the same allocator behaviour.
MALLOC_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**36)}
_ACCELERATOR_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin',
                        'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except
    return False


def cpu_only() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS starts with 'cpu', or it
  is unset and no accelerator plugin is installed."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if any(importlib.util.find_spec(m) is not None
         for m in _ACCELERATOR_MODULES):
    return False
  try:
    return not list(importlib.metadata.entry_points(group='jax_plugins'))
  except Exception:  # pylint: disable=broad-except
    return True


def _tune_malloc() -> str:
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return 'skipped (not glibc)'
  libc = ctypes.CDLL(None)
  ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)
  return 'no mmap, no trim' if ok else 'mallopt failed'


def _sync_dispatch() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  except (AttributeError, KeyError, ValueError) as e:
    return f'unchanged ({e})'
  return 'synchronous'


def configure_cpu_runtime() -> Dict[str, str]:
  """Applies the settings above if JAX will run on this CPU and has
  not started yet. Returns what was done (for logs and benchmark records);
  calling it again is harmless."""
  if os.environ.get(ENV_SWITCH, '1').strip().lower() in ('0', 'false', 'no',
                                                         'off'):
    return {'status': f'off ({ENV_SWITCH}=0)'}
  if not cpu_only():
    return {'status': 'off (accelerator platform)'}
  if _backend_started():
    return {'status': 'off (JAX backend already initialised)'}
  result = {'status': 'on', 'malloc': _tune_malloc(),
            'dispatch': _sync_dispatch()}
  logging.getLogger(__name__).debug('nfnets CPU runtime: %s', result)
  return result


def keep_tensorflow_off_accelerators() -> None:
  """Hides GPUs from TensorFlow, which only feeds the input pipeline on the
  host (a GPU build of TF would otherwise reserve GPU memory that JAX needs).
  Process-wide: entry points call it (`python -m nfnets.train`,
  scripts/eval.py), before the input pipeline starts."""
  with native_info_hidden():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # Already initialised / no such device.
    pass


# Native (C++) INFO lines: glog/absl format 'I1203 07:14:16.1 ...', and
# absl's notice that precedes the first of them.
_NATIVE_INFO = re.compile(r'^I\d{4} |^WARNING: All log messages before '
                          r'absl::InitializeLog\(\) is called')


@contextlib.contextmanager
def native_info_hidden(hide: bool = True):
  """Drops native INFO lines written to stderr (fd 2) inside the block and
  passes everything else through afterwards (with hide=False: nothing).

  TensorFlow 2.21 prints its oneDNN notice at import through absl C++
  logging, which ignores TF_CPP_MIN_LOG_LEVEL; this is the only way to keep
  it off the console without changing TensorFlow's numerics.
  """
  if not hide:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode('utf-8', 'replace')
      kept = [l for l in text.splitlines(keepends=True)
              if not _NATIVE_INFO.match(l)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()
