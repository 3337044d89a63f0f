"""Subprocess runs started when the session starts, awaited by their tests.

Some tests mostly wait on other processes (a training command, a pair of
multi-process workers, start-up error runs). Run in turn, each wait leaves a
core idle. A test module declares such a run as a job:

  @background.job
  def demo_run(tmp):  # tmp: a fresh pathlib.Path of its own
    return background.run([...])

and its tests request `demo_run` like a (session-scoped) fixture. Once
collection is done (conftest.py), the jobs that the selected tests request
start on one worker thread, in the order the tests will need them, and the
tests using jobs run last: by then the results are usually ready. The
fixture returns the job's result or raises its exception.

A job starts processes and reads files only: no JAX in the worker thread
(this process's devices belong to the in-process tests). Its processes get
the environment as it was when the session started (`env()`), whatever a
test monkeypatches meanwhile; they are killed if the session ends first.
"""
import collections
import concurrent.futures
import os
import pathlib
import resource
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

_ENV = dict(os.environ)  # conftest.py has set the suite's environment.
_JOBS = {}  # name -> function(tmp)
_FUTURES = {}  # name -> Future of its result
_STARTED = set()
_QUEUE = collections.deque()  # names for the worker thread, in order
_PROCS = []  # every process a job started
_TMPS = []
_TIMES = {}  # name -> [seconds it ran, seconds a test waited for it]
_LOCK = threading.Lock()
_WORKER = None
_CLOSED = False
_NICE = shutil.which('nice')


def job(fn):
  """Declares `fn(tmp)` as a background job and returns the session-scoped
  fixture of the same name that waits for its result."""
  name = fn.__name__
  _JOBS[name] = fn

  @pytest.fixture(scope='session', name=name)
  def _fixture():
    start = time.perf_counter()
    try:
      return result(name)
    finally:
      _TIMES.setdefault(name, [0.0, 0.0])[1] = time.perf_counter() - start
  _fixture.__doc__ = fn.__doc__
  return _fixture


def result(name):
  """The job's result, waiting for it; a job not started yet runs here and
  now (so a job may use another job's result)."""
  future = _schedule(name)
  with _LOCK:
    run_here = name not in _STARTED
    _STARTED.add(name)
  if run_here:
    _execute(name)
  return future.result()


def env(**extra):
  """The session's starting environment, updated with `extra`."""
  return dict(_ENV, **extra)


def popen(cmd, **kwargs):
  """subprocess.Popen (text mode, stdout and stderr piped into stdout unless
  given) with env() unless given, at a lower CPU priority (`nice`: the
  in-process tests keep their pace, the job uses the cycles they leave);
  the process is killed if the session ends before it does."""
  if _NICE:
    cmd = [_NICE, '-n', '10', *cmd]  # execs cmd: same pid, same signals
  kwargs.setdefault('env', env())
  kwargs.setdefault('stdout', subprocess.PIPE)
  kwargs.setdefault('stderr', subprocess.STDOUT)
  kwargs.setdefault('text', True)
  with _LOCK:
    if _CLOSED:
      raise RuntimeError('the test session has ended')
    proc = subprocess.Popen(cmd, **kwargs)
    _PROCS.append(proc)
  return proc


def run(cmd, timeout, **kwargs):
  """subprocess.run(cmd, capture_output=True, text=True) through popen():
  a CompletedProcess with separate stdout and stderr."""
  proc = popen(cmd, stderr=subprocess.PIPE, **kwargs)
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _execute(name):
  future = _FUTURES[name]
  if not future.set_running_or_notify_cancel():
    return
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'nfnets_{name}_'))
  _TMPS.append(tmp)
  start = time.perf_counter()
  try:
    future.set_result(_JOBS[name](tmp))
  except BaseException as e:  # pylint: disable=broad-except
    future.set_exception(e)
  finally:
    _TIMES.setdefault(name, [0.0, 0.0])[0] = time.perf_counter() - start


def _work():
  global _WORKER
  while True:
    with _LOCK:
      if _CLOSED or not _QUEUE:
        _WORKER = None
        return
      name = _QUEUE.popleft()
      if name in _STARTED:
        continue
      _STARTED.add(name)
    _execute(name)


def _schedule(name):
  """The job's future; queued for the worker thread if it was not."""
  global _WORKER
  with _LOCK:
    if name not in _FUTURES:
      _FUTURES[name] = concurrent.futures.Future()
      _QUEUE.append(name)
      if _WORKER is None and not _CLOSED:
        _WORKER = threading.Thread(target=_work, daemon=True,
                                   name='nfnets-background')
        _WORKER.start()
    return _FUTURES[name]


def reorder(items):
  """Moves the tests that use a job to the end of `items` (pytest's collected
  items, in place), both groups in their order: the in-process tests of
  every module run while the jobs do."""
  items.sort(key=lambda item: bool(_jobs_of(item)))  # stable


def start(items):
  """Starts the jobs that `items` (the selected tests) use, in the order
  they will need them."""
  for item in items:
    for name in _jobs_of(item):
      _schedule(name)


def _jobs_of(item):
  return [n for n in getattr(item, 'fixturenames', ()) if n in _JOBS]


def summary():
  """One line: each job's time and how long its first test waited for it,
  and the CPU time of this process and of all the processes it started
  ('' if no job ran)."""
  if not _TIMES:
    return ''
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return ('background jobs (ran s / waited s): ' + ', '.join(
      f'{name} {ran:.0f}/{waited:.0f}' for name, (ran, waited) in
      _TIMES.items()) + f'; CPU s: this process '
          f'{own.ru_utime + own.ru_stime:.0f}, subprocesses '
          f'{children.ru_utime + children.ru_stime:.0f}')


def close():
  """Kills the jobs' processes still running, waits for the worker and
  removes the jobs' directories (end of session)."""
  global _CLOSED
  with _LOCK:
    _CLOSED = True
    worker = _WORKER
    for future in _FUTURES.values():
      future.cancel()
    for proc in _PROCS:
      if proc.poll() is None:
        proc.kill()
  if worker is not None:
    worker.join()
  for tmp in _TMPS:
    shutil.rmtree(tmp, ignore_errors=True)
