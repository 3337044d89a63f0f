"""Helpers shared by the training tests: a tiny, fast config on digits."""
import contextlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# configs/demo.py shrunk to a few fast steps: a very small NFNet (stages of
# 16/32/96/96 channels) at 16 px, checkpoints every 3 steps, synchronous.
# Compiling is most of a tiny run: tests that train share one config (and
# TOTAL steps, which the learning-rate schedule bakes into the compiled step)
# so the session's persistent compilation cache (conftest.py) serves them.
TINY_OVERRIDES = {
    'model.kwargs.width': 0.0625, 'model.kwargs.group_size': 8,
    'model.kwargs.drop_rate': 0.0, 'train.eval_batch_size': 64,
    'train.log_every_steps': 2, 'train.sync_every_steps': 1,
    'train.eval_every_steps': 0, 'train.checkpoint_every_steps': 3,
    'train.async_checkpointing': False, 'data.image_size': 16,
    'data.eval_image_size': 16, 'optim.warmup_epochs': 0.0,
}


TOTAL = 12  # steps of the shared tiny runs (checkpoints kept: 6, 9, 12)
PMAP = {'parallel.backend': 'pmap', 'parallel.fsdp': False}
FSDP = {'parallel.backend': 'jit', 'parallel.fsdp': True}
# The shared runs' resumes (tests/conftest.py:tiny_runs): checkpoint
# RESUMED_AT of a run copied into a fresh workdir and trained to TOTAL.
RESUMED_AT = 6
RESUMES = {  # name: (the run resumed, under which backend)
    'pmap_to_fsdp': ('pmap', FSDP),
    'fsdp_to_pmap': ('fsdp', PMAP),
    'pmap_to_pmap': ('pmap', PMAP),
}
# The shared run 'hosts': pmap on the global batches of HOSTS hosts, the
# reference of the multi-process runs (tests/test_train_scale.py).
HOSTS = 2


def tiny_overrides(num_steps=TOTAL, batch_size=16):
  return dict(TINY_OVERRIDES, **{'train.num_steps': num_steps,
                                 'train.batch_size': batch_size})


def tiny_config(num_steps=TOTAL, batch_size=16, extra=None):
  """configs/demo.py with tiny_overrides() applied, then `extra`
  ({'parallel.backend': 'jit', ...}: dotted names, as on the command line)."""
  sys.path.insert(0, REPO)
  from configs import demo
  return override(demo.get_config(),
                  dict(tiny_overrides(num_steps, batch_size), **(extra or {})))


def override(config, values):
  """Sets {'train.batch_size': 16, ...} (dotted names, as on the command
  line) on a locked config; returns it."""
  for key, value in values.items():
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def tiny_args(workdir, num_steps=TOTAL, batch_size=16, extra=None):
  """Command-line arguments of `python -m nfnets.train` for the same config
  as tiny_config(num_steps, batch_size, extra)."""
  overrides = dict(tiny_overrides(num_steps, batch_size), **(extra or {}))
  return (['--config=configs/demo.py', f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in overrides.items()])


def train_process(workdir, num_steps=TOTAL, batch_size=16, extra=None):
  """`python -m nfnets.train` on tiny_config(num_steps, batch_size, extra)
  into `workdir`, started by a background job (tests/background.py); output
  and errors in proc.stdout."""
  import background  # pylint: disable=g-import-not-at-top
  return background.popen(
      [sys.executable, '-m', 'nfnets.train'] +
      tiny_args(str(workdir), num_steps, batch_size, extra),
      cwd=REPO, env=background.env(PYTHONPATH=REPO))


def train_command(workdir, num_steps=TOTAL, batch_size=16, extra=None):
  """Runs train_process(...) to its end; returns the final evaluation's
  results, as train_and_evaluate would."""
  proc = train_process(workdir, num_steps, batch_size, extra)
  try:
    out, _ = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-3000:]
  return final_eval(workdir)


def final_eval(workdir):
  """The last evaluation record of WORKDIR/metrics.jsonl."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if 'eval/count' in r]
  return evals[-1]


@contextlib.contextmanager
def emulated_hosts(hosts):
  """Within: nfnets.data.create_train_iterator yields the concatenation of
  what `hosts` hosts would each read, so one process trains on exactly the
  global batches of a `hosts`-process run (same global batch size)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnets import data  # pylint: disable=g-import-not-at-top
  single_host = data.create_train_iterator

  def create_train_iterator(cfg, *, global_batch_size, seed, start_step=0,
                            source=None):
    its = [single_host(cfg, global_batch_size=global_batch_size, seed=seed,
                       start_step=start_step, process_index=i,
                       process_count=hosts, source=source)
           for i in range(hosts)]
    while True:
      parts = [next(it) for it in its]
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  data.create_train_iterator = create_train_iterator
  try:
    yield
  finally:
    data.create_train_iterator = single_host
