"""The experiment loop end to end on the embedded digits (tiny model)."""
import glob
import importlib.util
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import nfnets.models as M
from nfnets import config as config_lib
from nfnets.checkpoints import run as checkpointing
from nfnets.training.loop import train_and_evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_images  # noqa: E402
import train_utils  # noqa: E402

REPO = train_utils.REPO


def _load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('name,arg', [('f0', None)] +
                         [('nfnet', f'F{i}') for i in range(1, 8)] +
                         [('nf_resnet50', None), ('nf_regnet_b0', None),
                          ('demo', None), ('finetune', None)])
def test_configs_load_and_build(name, arg):
  config = _load_config(os.path.join(REPO, 'configs', f'{name}.py'), arg)
  config_lib.validate(config, num_devices=8)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.train.batch_sise = 3  # locked: typos fail
  classes = 10 if config.data.name == 'digits' else 1000  # the dataset's
  config = config_lib.resolve(config, classes)
  config_lib.validate(config, num_devices=8)
  shapes = M.param_shapes(config.model.name, config.model.num_classes,
                          **config_lib.model_kwargs(config))
  assert shapes
  if name in ('f0', 'nfnet'):
    spec = M.get_variant(config.model.name)
    assert config.model.name == (arg or 'F0')
    assert (config.data.image_size, config.data.eval_image_size) == (
        spec.train_size, spec.test_size)
    assert config.data.randaug == spec.randaug  # the variant's own level
    assert config.train.batch_size == 4096 and config.train.num_epochs == 360


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  return [r for r in records if 'train/loss' in r], [
      r for r in records if 'eval/top1' in r]


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                         'checkpoints'))
                if s.isdigit())


TOTAL = train_utils.TOTAL


def test_train_eval_logs_and_mismatch(tiny_pmap_run, tmp_path):
  workdir, results = tiny_pmap_run
  # Every one of the 300 test digits counted exactly once (64-example eval
  # batches over 8 devices: the last batch is padded and masked).
  assert results['eval/count'] == 300 and results['eval_ema/count'] == 300
  assert 0 <= results['eval/top1'] <= results['eval/top5'] <= 1
  train, evals = _train_records(workdir)
  assert [r['step'] for r in train] == list(range(1, TOTAL + 1))
  for key in ('train/loss', 'train/top1', 'train/lr', 'train/throughput',
              'train/grad_norm'):
    assert all(np.isfinite(r[key]) for r in train), key
  assert evals and {'eval/top5', 'eval_ema/top1'} <= set(evals[-1])
  assert json.load(open(os.path.join(workdir, 'config.json')))['model'][
      'name'] == 'F0'
  assert _steps(workdir) == [6, 9, 12]  # every 3 steps, the last 3 kept
  assert glob.glob(os.path.join(workdir, 'tb', '*'))
  # The same workdir with another model (here: another class count, on an
  # image folder) fails clearly, and keeps the checkpoints.
  copy = str(tmp_path / 'run')
  shutil.copytree(os.path.join(workdir, 'checkpoints'),
                  os.path.join(copy, 'checkpoints'))
  folder = str(tmp_path / 'images')
  test_images.write_folder(folder)
  other = train_utils.tiny_config(extra={
      'data.name': 'folder', 'data.data_dir': folder,
      'data.train_split': 'train', 'data.eval_split': 'val'})
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match='different model'):
    train_and_evaluate(other, copy)
  assert _steps(copy) == [6, 9, 12]


def test_jit_fsdp_loop_equals_pmap_loop_and_averages_the_window(
    tiny_pmap_run, tiny_fsdp_run):
  """The loop under config.parallel 'jit' + FSDP trains the same model as
  under 'pmap', and a log covers every step since the previous one."""
  pmap_dir, results_p = tiny_pmap_run
  jit_dir, results_j = tiny_fsdp_run  # logs every 3 steps
  per_step, _ = _train_records(pmap_dir)
  window, _ = _train_records(jit_dir)
  assert [r['step'] for r in per_step] == list(range(1, TOTAL + 1))
  assert [r['step'] for r in window] == list(range(3, TOTAL + 1, 3))
  for i, record in enumerate(window):
    for key in ('train/loss', 'train/top1', 'train/grad_norm'):
      np.testing.assert_allclose(
          record[key], np.mean([r[key] for r in per_step[3 * i:3 * i + 3]]),
          rtol=1e-5, err_msg=key)
  assert results_j['eval/count'] == results_p['eval/count'] == 300
  np.testing.assert_allclose(results_j['eval/loss'], results_p['eval/loss'],
                             rtol=1e-5)
  for which in ('raw', 'ema'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                         atol=1e-7),
                 checkpointing.restore_params(jit_dir, which),
                 checkpointing.restore_params(pmap_dir, which))


def test_plot_metrics(tmp_path):
  from scripts import plot_metrics
  records = [{'step': 2, 'train/loss': 2.0, 'train/top1': 0.1,
              'train/lr': 0.1},
             {'step': 4, 'train/loss': 1.0, 'train/top1': 0.5,
              'train/lr': 0.05},
             {'step': 4, 'eval/top1': 0.6, 'eval_ema/top1': 0.55}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in records))
  plot_metrics.main([str(tmp_path)])
  png = tmp_path / 'metrics.png'
  assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(SystemExit, match='No metrics.jsonl'):
    plot_metrics.main([str(tmp_path / 'missing')])
