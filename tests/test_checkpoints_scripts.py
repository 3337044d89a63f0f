"""scripts/convert_checkpoint.py and scripts/eval.py, on tiny models."""
import importlib.util
import json
import os
import pickle

import dill
import numpy as np
import pytest

import nfnets.checkpoints as C
import nfnets.models as M
import test_checkpoints_released

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)
TINY_JSON = json.dumps(dict(TINY, depth=list(TINY['depth'])))


def _script(name):
  spec = importlib.util.spec_from_file_location(
      f'_nfnets_script_{name}', os.path.join(ROOT, 'scripts', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def random_tree(num_classes, seed=0):
  """Random values over the tiny F0's exact params tree."""
  return test_checkpoints_released.random_tree(
      M.param_shapes('F0', num_classes, **TINY), seed)


def _equal(a, b):
  return set(a) == set(b) and all(
      set(a[m]) == set(b[m]) and all(np.array_equal(a[m][n], b[m][n])
                                     for n in a[m]) for m in a)


def test_convert_released_to_npz_orbax_torch(tmp_path, capsys):
  convert = _script('convert_checkpoint')
  src = random_tree(1000)
  released = tmp_path / 'tiny_haiku.npz'
  released.write_bytes(dill.dumps(src))
  common = ['--input', str(released), '--variant', 'F0',
            '--model_kwargs', TINY_JSON]
  npz, orbax, torch_npz = (str(tmp_path / 'safe.npz'), str(tmp_path / 'orb'),
                           str(tmp_path / 'timm.npz'))
  assert convert.main(common + ['--output', npz, '--torch_out',
                                torch_npz]) == 0
  assert convert.main(common + ['--output', orbax, '--format', 'orbax']) == 0
  out = capsys.readouterr().out
  assert 'wrote' in out and 'timm dm_nfnet' in out
  for path in (npz, orbax, torch_npz):
    assert _equal(src, C.load_pretrained(path, 'F0', model_kwargs=TINY)), path
  # Refuses to overwrite: a user's mistake, one line and status 2.
  assert convert.main(common + ['--output', npz]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1, err


def test_convert_refuses_unsafe_pickle(tmp_path, capsys):
  convert = _script('convert_checkpoint')
  sentinel = tmp_path / 'ran'

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {sentinel}',))
  bad = tmp_path / 'F0_haiku.npz'
  bad.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': Evil()}}))
  assert convert.main(['--input', str(bad), '--output',
                       str(tmp_path / 'o.npz')]) == 2
  assert "'posix.system'" in capsys.readouterr().err or os.name != 'posix'
  assert not sentinel.exists() and not (tmp_path / 'o.npz').exists()


def test_eval_counts_every_digit_once(tmp_path):
  """A rigged classifier (w = 0, fixed bias) predicts the same ranking for
  every image, so the exact top-1/top-5 follow from the label counts."""
  from nfnets.data import digits  # pylint: disable=g-import-not-at-top
  evaluate = _script('eval')
  params = random_tree(10)
  bias = np.array([0.3, 0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.0, 0.5, 0.4],
                  np.float32)
  params['NFNet/~/linear'] = {'w': np.zeros((384, 10), np.float32), 'b': bias}
  labels = digits.load_arrays()['test'][1]
  top5 = np.argsort(-bias)[:5]
  cfg = evaluate.make_data_config('digits', 32)
  res = evaluate.evaluate(params, 'F0', cfg, batch_size=64,
                          model_kwargs=TINY)
  assert res['count'] == len(labels) == 300   # 5 batches, 20 padded
  assert res['top1'] == pytest.approx(np.mean(labels == np.argmax(bias)))
  assert res['top5'] == pytest.approx(np.mean(np.isin(labels, top5)))
  assert res['complete'] and res['images_per_sec'] > 0


def test_eval_cli_on_fake(tmp_path, capsys):
  evaluate = _script('eval')
  ckpt = C.save_npz(random_tree(1000), str(tmp_path / 'tiny.npz'))
  out = str(tmp_path / 'res.json')
  assert evaluate.main([
      '--checkpoint', ckpt, '--variant', 'F0', '--model_kwargs', TINY_JSON,
      '--dataset', 'fake', '--fake_examples', '20', '--image_size', '32',
      '--batch_size', '8', '--json_out', out]) == 0
  res = json.load(open(out))
  assert res['count'] == 20 and 0 <= res['top1'] <= res['top5'] <= 1
  assert 'top-1' in capsys.readouterr().out
  # A bad checkpoint is an error message, not a traceback.
  bad = tmp_path / 'bad.npz'
  bad.write_bytes(b'\x80\x04garbage')
  for path in (bad, tmp_path / 'missing.npz'):
    assert evaluate.main(['--checkpoint', str(path), '--dataset', 'fake']) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1, err
