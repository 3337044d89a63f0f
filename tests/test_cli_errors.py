"""Start-up mistakes through the real command line: one line on stderr,
`error: ...`, exit status 2, and nothing compiled (each run gets an empty
persistent XLA cache, which any compilation would write to)."""
import concurrent.futures
import os
import sys

import pytest

import background
import test_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args):
  """Runs `python -m nfnets.train ARGS` (or `python scripts/X.py ARGS` when
  the first argument is that script) with an empty persistent XLA cache of
  its own in tmp_path, and TensorFlow's C++ log level left to the command;
  returns (completed run, the cache's files)."""
  cache = tmp_path / 'xla_cache'
  cache.mkdir()
  env = background.env(PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=str(cache),
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)  # as a user's shell has it
  script = args and args[0].startswith('scripts/')
  cmd = [sys.executable, *(args if script else ('-m', 'nfnets.train', *args))]
  return background.run(cmd, timeout=300, cwd=REPO, env=env), list(
      cache.iterdir())


DEMO = '--config=configs/demo.py'
CASES = {
    # case: (arguments, what the line must say)
    'unknown_model': ([DEMO, '--config.model.name=F9'], "Unknown model 'F9'"),
    'unknown_model_in_file': (['--config=configs/nfnet.py:F9'],
                              "Unknown model 'F9'"),
    'misspelt_field': ([DEMO, '--config.model.kwargs.widht=2'],
                       "--config.model.kwargs.widht: no such config field. "
                       "Did you mean 'width'?"),
    'negative_batch': ([DEMO, '--config.train.batch_size=-4'],
                       'config.train.batch_size: must be positive'),
    'missing_image_folder': ([DEMO, '--config.data.name=folder',
                              '--config.data.data_dir={tmp}/nowhere'],
                             'has no train/ sub-folder'),
    'wrong_class_count': ([DEMO, '--config.model.num_classes=7'],
                          "'digits' has 10 classes"),
    'unknown_tfds_name': ([DEMO, '--config.data.name=cifar_10'],
                          "Unknown dataset 'cifar_10' (config.data.name). "
                          "Did you mean 'cifar10'"),
    'missing_split': ([DEMO, '--config.data.eval_split=valid'],
                      "config.data.eval_split: Split 'valid' is not valid for "
                      "digits"),
    'only_train_split': ([DEMO, '--config.data.name=folder',
                          '--config.data.data_dir={folder}'],
                         "has only a train split: set "
                         "config.data.train_split='train[:90%]'"),
    'missing_checkpoint': ([DEMO, '--config.init.checkpoint={tmp}/F0.npz'],
                           'F0.npz does not exist'),
}


RUNS = dict(
    {case: args + ['--workdir={tmp}/w'] for case, (args, _) in CASES.items()},
    debug=[DEMO, '--config.train.batch_size=-4',
           '--config.train.log_level=debug', '--workdir={tmp}/w'],
    dry_run=[DEMO, '--dry_run', '--workdir={tmp}/w'],
    # The scripts import TensorFlow before their first error can show.
    eval_script=['scripts/eval.py', '--checkpoint={tmp}/F0.npz'])


@background.job
def runs(tmp):
  """{run: (its tmp dir, completed run, compiled files)}. The runs are
  independent processes, mostly importing TensorFlow on one core: two at a
  time. {folder}: an image folder with a train split only."""
  folder = tmp / 'train_only'
  test_images.write_folder(str(folder))
  os.rename(folder / 'val', folder / 'held_back')

  def one(name):
    run_tmp = tmp / name
    run_tmp.mkdir()
    args = [a.format(tmp=run_tmp, folder=folder) for a in RUNS[name]]
    return (run_tmp, *_run(run_tmp, *args))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(zip(RUNS, pool.map(one, RUNS)))


@pytest.mark.parametrize('case', sorted(CASES))
def test_startup_mistake_is_one_line_exit_2(case, runs):
  tmp, run, compiled = runs[case]
  out = (run.stdout + run.stderr).strip()
  assert run.returncode == 2, out[-3000:]
  assert out.splitlines() == [out] and out.startswith('error: '), out[-3000:]
  assert CASES[case][1] in out, out
  assert 'Traceback' not in out and not compiled, (out, compiled)
  assert not (tmp / 'w').exists()


def test_script_error_is_one_line_without_tensorflow_notices(runs):
  """scripts/eval.py imports TensorFlow (to keep it off accelerators) before
  it reads the checkpoint: TensorFlow's native start-up notices stay off the
  console, and the mistake is one line, status 2."""
  run = runs['eval_script'][1]
  out = (run.stdout + run.stderr).strip()
  assert run.returncode == 2, out[-3000:]
  assert out.splitlines() == [out] and out.startswith('error: '), out[-3000:]
  assert 'F0.npz' in out, out


def test_debug_log_level_shows_the_traceback(runs):
  run = runs['debug'][1]
  assert run.returncode == 2
  assert 'Traceback' in run.stderr and 'ConfigError' in run.stderr
  assert run.stderr.strip().splitlines()[-1].startswith(
      'error: config.train.batch_size')


def test_dry_run_prints_the_resolved_config_and_model_size(runs):
  from nfnets import models  # pylint: disable=g-import-not-at-top
  tmp, run, compiled = runs['dry_run']
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout
  # The demo model (F0 at 1/8 width, depth 1 per stage) on the digits.
  params = models.count_params('F0', 10, width=0.125, depth=(1, 1, 1, 1),
                               group_size=16, drop_rate=0.1,
                               stochdepth_rate=0.0)
  assert f'{params / 1e6:.2f} M params' in out, out
  assert "train 'train' (1,497 examples), eval 'test' (300 examples)" in out
  assert 'train 32 px, eval 32 px, RandAugment off' in out and '10 classes' in out
  assert 'eval_split: test' in out and 'num_classes: 10' in out
  assert not compiled and not (tmp / 'w').exists()
