"""Fine-tuning pieces: configs/finetune.py and the checkpoint helpers."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nfnets.checkpoints as C
import nfnets.models as M
import test_images
import train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)


def _finetune_config(arg='demo'):
  spec = importlib.util.spec_from_file_location(
      '_nfnets_finetune_config', os.path.join(ROOT, 'configs', 'finetune.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_config_fields():
  from nfnets import config as config_lib  # pylint: disable=g-import-not-at-top
  c = _finetune_config()
  assert c.init.checkpoint is None and c.init.params == 'ema'
  assert c.init.reset_classifier is True and c.train.freeze_body is False
  assert c.data.name == 'digits' and c.model.num_classes is None  # the data's
  assert config_lib.model_kwargs(c)['width'] == TINY['width']  # configs/demo.py's
  c.init.checkpoint = '/some/run'  # settable from the command line
  with pytest.raises(AttributeError):
    c.init.chekpoint = 'typo'  # locked
  config_lib.validate(c)
  f0 = _finetune_config('F0')
  assert f0.model.name == 'F0' and 'width' not in config_lib.model_kwargs(f0)
  config_lib.validate(f0)
  with pytest.raises(ValueError):
    _finetune_config('cifar')


def test_reset_classifier_and_frozen_body_step(tmp_path):
  """Start from a 1000-class checkpoint, new 10-class head (kept from the
  model's init), body frozen: an SGD step changes only the classifier."""
  rng = np.random.default_rng(1)
  tree = lambda classes: {
      m: {n: rng.standard_normal(s.shape, dtype=np.float32) * 0.1
          for n, s in d.items()}
      for m, d in M.param_shapes('F0', classes, **TINY).items()}
  init, pretrained = tree(10), tree(1000)  # init: stands in for fwd.init
  path = C.save_npz(pretrained, str(tmp_path / 'pre.npz'))
  params = C.init_from_checkpoint(init, path, variant='F0', model_kwargs=TINY)
  assert params['NFNet/~/linear'] == init['NFNet/~/linear']
  assert np.array_equal(params['NFNet/~/nf_block_2/~/conv1b']['w'],
                        pretrained['NFNet/~/nf_block_2/~/conv1b']['w'])
  with pytest.raises(C.ParamMismatchError, match='reset_classifier'):
    C.init_from_checkpoint(init, path, variant='F0', model_kwargs=TINY,
                           reset_classifier=False)

  mask = C.trainable_mask(params)  # freeze_body=True
  labels_tree = jax.tree.map(lambda t: 'train' if t else 'freeze', mask)
  tx = optax.multi_transform({'train': optax.sgd(0.1),
                              'freeze': optax.set_to_zero()}, labels_tree)

  @jax.jit
  def sgd_step(p):
    grads = jax.tree.map(jnp.ones_like, p)  # any non-zero gradient
    updates, _ = tx.update(grads, tx.init(p), p)
    return optax.apply_updates(p, updates)
  new = jax.device_get(sgd_step(params))
  for m in params:
    for n in params[m]:
      same = np.array_equal(new[m][n], params[m][n])
      assert same == (m != 'NFNet/~/linear'), (m, n)


def test_end_to_end_with_training_loop(tiny_pmap_run, tmp_path):
  """configs/finetune.py starts from a training run's EMA params (the shared
  tiny demo run, 10 classes) with a new classifier and a frozen body, on an
  image folder of 3 classes (JPEG, PNG, grey, one corrupt file per split):
  the head follows the data's class count, the body stays the run's EMA
  params, and the eval counts every decodable val image once."""
  from nfnets import config as config_lib  # pylint: disable=g-import-not-at-top
  from nfnets.training.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
  run, _ = tiny_pmap_run
  tiny = config_lib.model_kwargs(train_utils.tiny_config())
  before = C.load_pretrained(run, 'F0', model_kwargs=tiny)  # EMA params
  folder = str(tmp_path / 'images')
  test_images.write_folder(folder)
  # The tiny run's model and sizes (train_utils), a few steps.
  tiny_model = {k: v for k, v in train_utils.tiny_overrides().items()
                if k.startswith(('model.', 'data.'))}
  g = train_utils.override(_finetune_config(), dict(tiny_model, **{
      'init.checkpoint': run, 'train.freeze_body': True,
      'model.num_classes': None,  # follow the data
      'data.name': 'folder', 'data.data_dir': folder,
      'data.train_split': 'train', 'data.eval_split': 'val',
      'train.num_steps': 3, 'train.batch_size': 16,
      'train.eval_every_steps': 0, 'train.checkpoint_every_steps': 0,
      'train.async_checkpointing': False,
      'train.eval_batch_size': 8,  # 9 decodable val images: a padded batch
      'optim.warmup_epochs': 0.0}))
  results = train_and_evaluate(g, str(tmp_path / 'ft_folder'))
  assert results['eval/count'] == results['eval_ema/count'] == 9
  after = C.load_pretrained(str(tmp_path / 'ft_folder'), 'F0', which='raw',
                            model_kwargs=tiny)
  head = after['NFNet/~/linear']
  assert head['w'].shape[-1] == 3 and head['b'].shape == (3,)
  assert before['NFNet/~/linear']['b'].shape == (10,)
  assert set(after) == set(before)
  for m in before:
    if m != 'NFNet/~/linear':
      for n in before[m]:
        assert np.array_equal(before[m][n], after[m][n]), (m, n)
  with open(tmp_path / 'ft_folder' / 'config.json') as f:
    assert '"num_classes": 3' in f.read()  # the resolved value is recorded
