"""Export for serving (nfnets/export.py, scripts/export.py): every format's
logits equal the Haiku model's, the class count survives, and the weight
standardisation is folded (computed once at export, not in the graph)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import checkpoints
from nfnets import export as export_lib
import nfnets.models as M

VARIANT = 'F0'
TINY = dict(width=0.25, depth=(1, 1, 1, 1), group_size=16)
CLASSES = 10
SIZE = 32


def _random_params(fwd):
  """Random weights of the model's shapes (numpy; no jitted init to
  compile): non-trivial gains, biases and skip gains."""
  shapes = jax.eval_shape(lambda k: fwd.init(k, jnp.zeros((1, SIZE, SIZE, 3)),
                                             False), jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)

  def draw(name, shape):
    if len(shape) >= 2:  # kernels: variance-preserving
      return rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    if 'gain' in name:  # gains and skip_gain
      return rng.uniform(0.5, 1.5, shape)
    return 0.1 * rng.randn(*shape)  # biases
  return {m: {k: draw(k, v.shape).astype(np.float32) for k, v in ps.items()}
          for m, ps in shapes.items()}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A '10-class fine-tuned' tiny F0 saved as an .npz load_pretrained reads,
  and its reference logits (the Haiku model, standardising in every call).
  Batch 1 is the first row of a batch of 3 (one compile)."""
  fwd = M.forward_fn(VARIANT, CLASSES, conv_lowering='xla', **TINY)
  params = _random_params(fwd)
  path = str(tmp_path_factory.mktemp('ckpt') / 'finetuned10.npz')
  checkpoints.save_npz(params, path)
  from nfnets.data.preprocess import MEAN_RGB, STDDEV_RGB
  images = np.random.RandomState(1).uniform(
      0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
  normalised = (images - np.float32(MEAN_RGB)) / np.float32(STDDEV_RGB)
  ref = jax.jit(lambda p, x: fwd.apply(p, None, x, False)['logits'])(
      params, jnp.asarray(normalised))
  return dict(path=path, params=params, images=images, ref=np.asarray(ref))


@pytest.fixture(scope='module')
def exports(tiny, tmp_path_factory):
  """One export per format from the checkpoint file: stablehlo through the
  CLI's main (in-process), the others through export()."""
  out = tmp_path_factory.mktemp('exports')
  paths = {}
  from scripts import export as export_cli
  paths['stablehlo'] = str(out / 'tiny.stablehlo')
  assert export_cli.main([
      '--checkpoint', tiny['path'], '--format', 'stablehlo', '--out',
      paths['stablehlo'], '--variant', VARIANT, '--image_size', str(SIZE),
      '--model_kwargs', json.dumps(TINY), '--no_verify']) == 0
  paths['savedmodel'] = export_lib.export(
      tiny['path'], VARIANT, 'savedmodel', str(out / 'tiny_savedmodel'),
      image_size=SIZE, model_kwargs=TINY, verify=False)
  try:
    import jax2onnx  # noqa: F401  pylint: disable=unused-import
    import onnxruntime  # noqa: F401  pylint: disable=unused-import
  except ImportError:
    pass  # the onnx tests skip themselves
  else:
    # verify=True: export() runs onnxruntime against the Haiku model itself.
    paths['onnx'] = export_lib.export(
        tiny['path'], VARIANT, 'onnx', str(out / 'tiny.onnx'),
        image_size=SIZE, model_kwargs=TINY, verify=True)
  return paths


def _skip_without_onnx(fmt, exports):
  if fmt == 'onnx' and 'onnx' not in exports:
    pytest.skip("jax2onnx / onnxruntime not installed (pip install "
                "'nfnets[onnx]')")


@pytest.mark.parametrize('fmt', export_lib.FORMATS)
def test_logits_equal_haiku_for_batch_1_and_3(fmt, tiny, exports):
  _skip_without_onnx(fmt, exports)
  for batch in (1, 3):
    ref = tiny['ref'][:batch]
    got = export_lib.run_exported(exports[fmt], fmt, tiny['images'][:batch])
    assert got.shape == (batch, CLASSES)  # the fine-tuned 10 classes
    np.testing.assert_allclose(got, ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize('fmt', export_lib.FORMATS)
def test_export_describes_itself(fmt, exports):
  _skip_without_onnx(fmt, exports)
  path = exports[fmt]
  info_path = (os.path.join(path, 'export_info.json') if fmt == 'savedmodel'
               else path + '.json')
  with open(info_path) as f:
    info = json.load(f)
  assert (info['variant'], info['num_classes'], info['image_size']) == (
      VARIANT, CLASSES, SIZE)
  assert info['folded_weight_standardization'] is True
  if fmt == 'stablehlo':  # served on CPU here; lowered for CUDA too
    assert tuple(export_lib.load_stablehlo(path).platforms) == (
        export_lib.STABLEHLO_PLATFORMS)


def _kernel_reductions(exported):
  """stablehlo.reduce ops over a static rank-4 tensor: conv kernels (the
  activations have the symbolic batch, '?x...')."""
  text = exported.mlir_module()
  return re.findall(r'stablehlo\.reduce\(.*\(tensor<\d+x\d+x\d+x\d+xf32>',
                    text)


def test_stablehlo_has_no_kernel_standardisation(tiny, exports, tmp_path):
  folded = export_lib.load_stablehlo(exports['stablehlo'])
  assert _kernel_reductions(folded) == []
  assert folded.in_avals[0].shape[1:] == (SIZE, SIZE, 3)
  assert not isinstance(folded.in_avals[0].shape[0], int)  # symbolic batch
  # Control: without folding, every call standardises the kernels again.
  path = export_lib.export(tiny['params'], VARIANT, 'stablehlo',
                           str(tmp_path / 'raw.stablehlo'), image_size=SIZE,
                           model_kwargs=TINY, fold=False, verify=False)
  assert len(_kernel_reductions(export_lib.load_stablehlo(path))) >= 25


def _conv_gain_elements(params):
  return sum(v['gain'].size for v in params.values()
             if np.ndim(v.get('w')) == 4)


def test_savedmodel_ships_folded_kernels_only(tiny, exports):
  import tensorflow as tf
  loaded = tf.saved_model.load(exports['savedmodel'])
  shipped = sum(int(np.prod(v.shape)) for v in loaded.weights)
  total = sum(v.size for m in tiny['params'].values() for v in m.values())
  assert shipped == total - _conv_gain_elements(tiny['params'])


def test_onnx_conv_kernels_are_constants(exports):
  _skip_without_onnx('onnx', exports)
  import onnx
  graph = onnx.load(exports['onnx']).graph
  producer = {o: n for n in graph.node for o in n.output}
  initializers = {i.name for i in graph.initializer}

  def ops_behind(name, seen):
    if name in initializers or name not in producer:
      return seen
    node = producer[name]
    seen.add(node.op_type)
    for i in node.input:
      ops_behind(i, seen)
    return seen
  convs = [n for n in graph.node if n.op_type == 'Conv']
  assert len(convs) >= 25
  for conv in convs:  # the kernel is a constant, at most re-laid-out
    assert ops_behind(conv.input[1], set()) <= {'Transpose', 'Reshape',
                                                'Identity', 'Cast'}


def test_bad_format_and_missing_out_path(tiny):
  with pytest.raises(ValueError, match='stablehlo'):
    export_lib.export(tiny['params'], VARIANT, 'tflite', '/tmp/x')
  with pytest.raises(ValueError, match='out_path'):
    export_lib.export(tiny['params'], VARIANT, 'onnx', None)


def test_workdir_config_names_the_model(tmp_path):
  """A training workdir's config.json gives the variant and overrides, from
  the workdir, its checkpoints/ or a step directory."""
  model = {'name': 'F1', 'num_classes': 10,
           'kwargs': {'width': 0.5, 'depth': [1, 2, 3, 4], 'alpha': None}}
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump({'model': model}, f)
  step_dir = tmp_path / 'checkpoints' / '30'
  step_dir.mkdir(parents=True)
  for path in (tmp_path, tmp_path / 'checkpoints', step_dir):
    assert export_lib._run_config_model(path) == (
        'F1', {'width': 0.5, 'depth': [1, 2, 3, 4]})
  assert export_lib._run_config_model(tmp_path.parent / 'elsewhere') == (
      None, None)
