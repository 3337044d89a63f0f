"""Tiny training runs in turn in one process (tests/conftest.py's shared
runs): one start-up (TensorFlow, JAX) instead of one per run.

  python tests/train_runs_worker.py RUNS_JSON

RUNS_JSON: a list of {"workdir": DIR, "extra": {"parallel.backend": ...},
"resume_from": CHECKPOINT_DIR or null, "hosts": N or null}. Each run copies
resume_from (a step directory of an earlier run) into DIR/checkpoints, then
trains train_utils.tiny_config(extra=extra) into DIR with train_and_evaluate,
on the global batches of N hosts if "hosts" is given
(train_utils.emulated_hosts).
"""
import contextlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_utils  # noqa: E402


def main():
  from nfnets.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  with open(sys.argv[1]) as f:
    runs = json.load(f)
  for run in runs:
    if run.get('resume_from'):
      src = run['resume_from']
      shutil.copytree(src, os.path.join(run['workdir'], 'checkpoints',
                                        os.path.basename(src)))
    hosts = run.get('hosts')
    with (train_utils.emulated_hosts(hosts) if hosts else
          contextlib.nullcontext()):
      train_and_evaluate(train_utils.tiny_config(extra=run['extra']),
                         run['workdir'])


if __name__ == '__main__':
  main()
