"""The experiment config: declared knobs, command-line overrides, resolution."""
import glob
import importlib.util
import inspect
import json
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from nfnets import config as config_lib
from nfnets import models as M
from nfnets import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# arXiv 2102.06171 Table 1 / Appendix: train px, test px, RandAugment, dropout.
PAPER_F = {'F0': (192, 256, '405', 0.2), 'F1': (224, 320, '410', 0.3),
           'F2': (256, 352, '410', 0.4), 'F3': (320, 416, '415', 0.4),
           'F4': (384, 512, '415', 0.5), 'F5': (416, 544, '415', 0.5),
           'F6': (448, 576, '415', 0.5), 'F7': (480, 608, '415', 0.5)}
# arXiv 2101.08692 appendix: NF-RegNet train px, test px, dropout.
PAPER_B = {0: (192, 224, 0.2), 1: (224, 256, 0.2), 2: (240, 272, 0.3),
           3: (288, 320, 0.3), 4: (320, 384, 0.4), 5: (384, 456, 0.4),
           6: (448, 528, 0.5), 7: (512, 600, 0.5), 8: (600, 672, 0.5)}


def parse(*args):
  """Parses command-line args as nfnets.train does (locked config)."""
  argv = ['prog'] + list(args)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      '_cfg', os.path.join(REPO, 'configs', f'{name}.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def leaves(config, prefix=''):
  """(dotted path, declared type, value) of every field."""
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', config.get_type(key), value


def sample_value(path, kind, current):
  """A command-line string of the field's type, different from `current`."""
  if path == 'optim.agc_clipping':
    return 'by_batch', 'by_batch'
  if kind is bool:
    return str(not current), not current
  if kind is int:
    return '3', 3
  if kind is float:
    return '0.375', 0.375
  if kind is tuple:
    return '(1, 2, 3, 4)', (1, 2, 3, 4)
  if kind is str:
    return 'xla', 'xla'
  raise AssertionError(f'{path}: no sample for type {kind}')


def test_every_declared_field_overrides_on_f0():
  fields = list(leaves(config_lib.base_config()))
  assert len(fields) == 81  # update when a knob is added
  args, expect = ['--config=configs/f0.py'], {}
  for path, kind, current in fields:
    text, value = sample_value(path, kind, current)
    args.append(f'--config.{path}={text}')
    expect[path] = value
  config = parse(*args)
  for path, value in expect.items():
    got = config
    for name in path.split('.'):
      got = got[name]
    assert got == value, path


@pytest.mark.parametrize('arg', [
    'model.kwargs.width=2.0', 'model.kwargs.remat=True',
    'model.kwargs.depth=(2,2,2,2)', 'model.kwargs.conv_lowering=cpu',
    'model.kwargs.stochdepth_rate=0.1', 'model.kwargs.activation=relu',
    'data.num_chunks=4', 'data.randaug_mode=increasing', 'data.xla=False',
    'data.digits_pad=0', 'data.image_key=img', 'data.fake_train_examples=64',
    'parallel.backend=jit', 'parallel.fsdp=True', 'train.grad_accum_steps=2',
    'train.log_level=info', 'model.eval_compute_dtype=auto',
    'optim.agc_clipping=0.02', 'optim.agc_clipping=by_batch',
    'optim.lr_scaling=none', 'optim.cosine_end_lr=0.001'])
def test_documented_overrides_parse(arg):
  path, text = arg.split('=')
  config = parse('--config=configs/f0.py', f'--config.{arg}')
  node = config
  for name in path.split('.'):
    node = node[name]
  assert str(node) == text or node == type(node)(eval(text))  # pylint: disable=eval-used
  if path == 'optim.agc_clipping':
    assert node == ('by_batch' if text == 'by_batch' else 0.02)


@pytest.mark.parametrize('arg', ['model.kwargs.widht=2.0',
                                 'data.randaugment=405', 'train.batch_sise=8',
                                 'optim.lr_per_256=0.1'])
def test_misspelt_override_fails(arg):
  with pytest.raises(AttributeError):
    parse('--config=configs/f0.py', f'--config.{arg}')


def test_wrong_type_override_fails():
  with pytest.raises(flags.IllegalFlagValueError):
    parse('--config=configs/f0.py', '--config.model.kwargs.width=wide')


def test_model_kwargs_declares_the_constructors_overrides():
  families = {'nfnet': M.NFNet, 'nf_resnet': M.NFResNet,
              'nf_regnet': M.NFRegNet}
  taken = set()
  for cls in families.values():
    params = set(inspect.signature(cls).parameters)
    params -= {'num_classes', 'variant', 'name'}
    assert params <= set(config_lib.MODEL_KWARGS), cls
    taken |= params
  assert taken == set(config_lib.MODEL_KWARGS)


def test_model_kwargs_helper():
  assert config_lib.model_kwargs(load('f0')) == {}
  demo = config_lib.model_kwargs(load('demo'))
  assert demo == {'width': 0.125, 'depth': (1, 1, 1, 1), 'group_size': 16,
                  'stochdepth_rate': 0.0, 'drop_rate': 0.1}
  shapes = M.param_shapes('F0', 10, **demo)
  assert shapes['NFNet/~/linear']['w'].shape == (384, 10)


@pytest.mark.parametrize('name', M.variants())
def test_resolve_follows_the_variant_table(name):
  config = load('f0')
  config.model.name = name
  spec = M.get_variant(name)
  r = config_lib.resolve(config, 1000)
  assert r.model.name == spec.name
  got = (r.data.image_size, r.data.eval_image_size, r.data.randaug,
         r.model.kwargs.drop_rate)
  if spec.family == 'nfnet':
    assert got == PAPER_F[name.rstrip('+')]
    assert (r.train.batch_size, r.train.num_epochs) == (4096, 360)
    assert r.optim.use_agc and r.optim.lr_scaling == 'linear'
    assert (r.optim.lr, r.optim.weight_decay) == (0.1, 2e-5)
    assert (r.data.mixup_alpha, r.data.cutmix) == (0.2, True)
  elif spec.family == 'nf_regnet':
    level = int(name[-1])
    train, test, drop = PAPER_B[level]
    assert got == (train, test, '', drop)
    # experiment_nf_regnets.py: SGD without AGC, lr 0.4 unscaled, batch 1024
    assert not r.optim.use_agc and r.optim.lr_scaling == 'none'
    assert (r.optim.lr, r.train.batch_size, r.optim.cosine_end_lr) == (
        0.4, 1024, 0.001)
    assert r.optim.weight_decay == pytest.approx(5e-5 + 1e-5 * level)
    assert (r.data.mixup_alpha, r.data.cutmix) == (0.2, True)
  elif spec.family == 'nfnet_l':  # timm's px; RandAugment/dropout/recipe: F's
    px = {'eca_nfnet_l0': (224, 288), 'nfnet_l0': (224, 288),
          'eca_nfnet_l1': (256, 320), 'eca_nfnet_l2': (320, 384)}[name]
    like = {'eca_nfnet_l1': 'F1', 'eca_nfnet_l2': 'F2'}.get(name, 'F0')
    assert got == px + PAPER_F[like][2:]
    assert r.optim.use_agc and (r.optim.lr, r.train.batch_size) == (0.1, 4096)
  elif spec.family == 'nf_resnet_timm':  # timm's 256/288 px, NF-ResNet recipe
    assert got == (256, 288, '', 0.25)
    assert (r.data.mixup_alpha, r.data.cutmix) == (0.0, False)
  else:
    assert got == (224, 224, '', 0.25)
    assert (r.data.mixup_alpha, r.data.cutmix) == (0.0, False)
  assert r.model.num_classes == r.data.num_classes == 1000
  config_lib.validate(r, num_devices=8)
  # the original is untouched
  assert config.data.image_size is None and config.model.num_classes is None


def test_variant_override_on_the_command_line_brings_its_recipe():
  # Issue: `--config=configs/f0.py --config.model.name=F1` trained F1 at F0's
  # 192/256 px with RandAugment '405'.
  r = config_lib.resolve(parse('--config=configs/f0.py',
                               '--config.model.name=F1'), 1000)
  assert (r.data.image_size, r.data.eval_image_size, r.data.randaug,
          r.model.kwargs.drop_rate) == (224, 320, '410', 0.3)
  r = config_lib.resolve(parse('--config=configs/nfnet.py:F3'), 1000)
  assert (r.model.name, r.data.image_size, r.data.randaug) == ('F3', 320, '415')
  r = config_lib.resolve(parse('--config=configs/nf_regnet_b0.py',
                               '--config.model.name=nf_regnet_b3'), 1000)
  assert r.optim.weight_decay == pytest.approx(8e-5)
  assert (r.data.image_size, r.model.compute_dtype) == (288, 'float32')


def test_explicit_values_win():
  config = parse('--config=configs/f0.py', '--config.model.name=F3',
                 '--config.data.image_size=160', '--config.data.randaug=',
                 '--config.model.kwargs.drop_rate=0.0',
                 '--config.train.batch_size=256', '--config.optim.use_agc=False',
                 '--config.optim.weight_decay=0.0')
  r = config_lib.resolve(config, 1000)
  assert (r.data.image_size, r.data.eval_image_size) == (160, 416)
  assert r.data.randaug == '' and r.model.kwargs.drop_rate == 0.0
  assert r.train.batch_size == 256 and r.optim.weight_decay == 0.0
  assert not r.optim.use_agc


def test_num_classes_from_the_dataset():
  r = config_lib.resolve(load('f0'), 37)
  assert r.model.num_classes == r.data.num_classes == 37
  assert r.is_locked
  config = load('f0')
  config.model.num_classes = 10
  with pytest.raises(ValueError, match=r'10.*1000|1000.*10'):
    config_lib.resolve(config, 1000)
  assert config_lib.resolve(load('demo'), 10).model.num_classes == 10


def test_resolved_config_json_records_the_values():
  r = config_lib.resolve(parse('--config=configs/f0.py',
                               '--config.model.name=F2'), 1000)
  d = json.loads(r.to_json_best_effort())
  assert d['data']['image_size'] == 256 and d['data']['randaug'] == '410'
  assert d['model']['kwargs']['drop_rate'] == 0.4
  assert d['optim']['agc_clipping'] == 0.01 and d['train']['batch_size'] == 4096


def test_describe():
  line = config_lib.describe(config_lib.resolve(
      parse('--config=configs/f0.py', '--config.model.name=F1'), 1000))
  assert '\n' not in line
  for part in ('F1', 'train 224 px', 'eval 320 px', 'RandAugment 410',
               'dropout 0.3', 'batch 4096', 'lr 1.6', '\u03bb 0.01',
               '360 epochs'):
    assert part in line, (part, line)
  line = config_lib.describe(config_lib.resolve(load('nf_regnet_b0'), 1000))
  assert 'no AGC' in line and 'lr 0.4' in line and 'RandAugment off' in line
  config = load('demo')
  config.train.num_steps = 7
  line = config_lib.describe(config_lib.resolve(config, 10))
  assert '7 steps' in line and '\u03bb 0.08 (by_batch)' in line


@pytest.mark.parametrize('override, field', [
    ({'model.kwargs.use_two_convs': True, 'model.name': 'nf_regnet_b0'},
     'model.kwargs.use_two_convs'),
    ({'model.kwargs.conv_lowering': 'gpu'}, 'model.kwargs.conv_lowering'),
    ({'parallel.fsdp': True}, 'parallel.fsdp'),
    ({'parallel.backend': 'pjit'}, 'parallel.backend'),
    ({'optim.agc_clipping': 'by_bach'}, 'optim.agc_clipping'),
    ({'optim.lr_scaling': 'sqrt'}, 'optim.lr_scaling'),
    ({'train.grad_accum_steps': 3, 'train.batch_size': 4096},
     'train.grad_accum_steps'),
    ({'train.log_level': 'loud'}, 'train.log_level'),
    ({'model.eval_compute_dtype': 'float16'}, 'model.eval_compute_dtype'),
    ({'data.image_size': 0}, 'data.image_size'),
])
def test_validate_names_the_field(override, field):
  config = load('f0')
  config.update_from_flattened_dict(override)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    config_lib.resolve(config, 1000)
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize('path', sorted(glob.glob(
    os.path.join(REPO, 'configs', '*.py'))))
def test_every_config_loads_validates_and_resolves(path):
  name = os.path.basename(path)[:-3]
  config = load(name)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.train.batch_sise = 3
  config_lib.validate(config, num_devices=8)
  r = config_lib.resolve(config, 10 if config.data.name == 'digits' else 1000)
  config_lib.validate(r, num_devices=8)
  assert None not in (r.data.image_size, r.data.eval_image_size,
                      r.data.randaug, r.train.batch_size, r.optim.lr,
                      r.optim.weight_decay, r.model.kwargs.drop_rate)
  tx, _ = optim.make_optimizer(r.optim, batch_size=r.train.batch_size,
                               steps_per_epoch=100.0, total_steps=10_000)
  assert tx is not None


def test_f0_is_nfnet_f0_and_demo_finetune_share_the_model():
  assert load('f0').to_dict() == load('nfnet', 'F0').to_dict()
  assert load('nfnet').model.name == 'F0'
  demo, ft = load('demo'), load('finetune')
  assert demo.model.to_dict() == ft.model.to_dict()
  for key in ('name', 'image_size', 'randaug', 'mixup_alpha', 'cutmix'):
    assert demo.data[key] == ft.data[key]
  f3 = load('finetune', 'F3')
  assert f3.model.name == 'F3' and config_lib.model_kwargs(f3) == {}
