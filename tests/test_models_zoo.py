"""Model zoo: paper parameter counts and FLOPs, released parameter tree,
forward/backward of every variant."""
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets.models as M
from nfnets.models import registry
import release_trees
from test_checkpoints_released import random_tree

# Paper (arXiv 2102.06171) table: params (M) at 1000 classes, FLOPs (B) at the
# test resolution. F7 is not in the paper; its figures are our computed ones.
PAPER = {
    'F0': (71.5, 12.38), 'F1': (132.6, 35.54), 'F2': (193.8, 62.59),
    'F3': (254.9, 114.76), 'F4': (316.1, 215.24), 'F5': (377.2, 289.76),
    'F6': (438.4, 377.28), 'F7': (499.5, 478.78),
}


@pytest.mark.parametrize('name', sorted(PAPER))
def test_param_count_and_flops_match_paper(name):
  params, flops = PAPER[name]
  assert round(M.count_params(name) / 1e6, 1) == params
  assert abs(M.count_flops(name) / 1e9 - flops) / flops < 0.01


def test_regnet_and_resnet_sizes():
  # NF-RegNet-B0 ~ 8.3M params / 0.44B FLOPs in arXiv 2101.08692; standard
  # ResNet-50 has 25.6M params and ~4.1B multiply-adds.
  assert abs(M.count_params('nf_regnet_b0') / 1e6 - 8.3) < 0.5
  assert abs(M.count_flops('nf_regnet_b0') / 1e9 - 0.44) < 0.02
  assert round(M.count_params('nf_resnet50') / 1e6, 1) == 25.6
  assert abs(M.count_flops('nf_resnet50') / 1e9 - 4.1) < 0.05


def test_f0_tree_matches_released_checkpoint_layout():
  shapes = M.param_shapes('F0', 1000)
  blocks = [f'NFNet/~/nf_block{"" if i == 0 else f"_{i}"}' for i in range(12)]
  expected = {f'NFNet/~/stem_conv{i}' for i in range(4)}
  expected |= {'NFNet/~/final_conv', 'NFNet/~/linear'} | set(blocks)
  transitions = {0, 1, 3, 9}  # first block of each stage
  for i, b in enumerate(blocks):
    convs = ['conv0', 'conv1', 'conv1b', 'conv2'] + (
        ['conv_shortcut'] if i in transitions else [])
    expected |= {f'{b}/~/{c}' for c in convs}
    expected |= {f'{b}/~/squeeze_excite/~/linear',
                 f'{b}/~/squeeze_excite/~/linear_1'}
  assert set(shapes) == expected
  for path, leaves in shapes.items():
    if re.search(r'conv', path):
      assert set(leaves) == {'w', 'gain', 'bias'}, path
      assert leaves['gain'].shape == (leaves['w'].shape[-1],)
    elif path in blocks:
      assert set(leaves) == {'skip_gain'} and leaves['skip_gain'].shape == ()
    else:
      assert set(leaves) == {'w', 'b'}, path
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(shapes))
  assert shapes['NFNet/~/stem_conv0']['w'].shape == (3, 3, 3, 16)
  assert shapes['NFNet/~/stem_conv3']['w'].shape == (3, 3, 64, 128)
  assert shapes['NFNet/~/nf_block_3/~/conv1']['w'].shape == (3, 3, 128, 768)
  assert shapes['NFNet/~/final_conv']['w'].shape == (1, 1, 1536, 3072)
  assert shapes['NFNet/~/linear']['w'].shape == (3072, 1000)


def _tiny(name):
  spec = M.get_variant(name)
  if spec.family == 'nfnet':
    return dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)
  if spec.family == 'nf_resnet':
    return dict(width=0.125, depth=(1, 1, 1, 1))
  if spec.family == 'nfnet_l':
    return dict(width=0.0625, depth=(1, 1, 1, 1), group_size=8)
  return dict(width=0.5, depth=(1, 1, 1, 1))


# One representative per family and width pattern: with the tiny override,
# F0..F7 (and B-variants) differ only in depth/width, which the full-size
# tracing below and the count tests cover.
_REPRESENTATIVES = ['F0', 'F7+', 'nf_resnet26', 'nf_seresnet50', 'nf_regnet_b0',
                    'nf_regnet_b8']


@pytest.mark.parametrize('name', _REPRESENTATIVES)
def test_forward_tiny(name):
  """Forward in train/eval mode and with bf16 inputs (narrow/shallow
  override, 32 px): shapes, dtypes, finiteness."""
  fwd = M.forward_fn(name, num_classes=7, **_tiny(name))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = jax.jit(fwd.init, static_argnums=2)(jax.random.PRNGKey(1), x, True)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  # param_shapes (which skips the initialisers) describes the same tree.
  assert jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                      params) == M.param_shapes(name, 7, **_tiny(name))
  apply = jax.jit(fwd.apply, static_argnums=3)
  out_eval = apply(params, None, x, False)
  out_train = apply(params, jax.random.PRNGKey(2), x, True)
  out_bf16 = apply(params, None, x.astype(jnp.bfloat16), False)
  for out in (out_eval, out_train, out_bf16):
    assert out['logits'].shape == (2, 7)
    assert out['logits'].dtype == jnp.float32
    assert np.all(np.isfinite(out['logits']))
  np.testing.assert_allclose(out_bf16['logits'], out_eval['logits'],
                             atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    'name', [v for v in M.variants() if not v.startswith('F')])
def test_every_variant_traces_at_full_size(name):
  """Every NF-ResNet/NF-RegNet row traces at full size at a tiny resolution
  (F-rows are traced at full size by the count tests): bf16 images, float32
  logits and parameters. One trace, the initialisation's forward pass, with
  zeros for the initialisers (tracing those is not the point here)."""
  logits = []

  def forward(images):
    # param_shapes' creator (zeros instead of the initialisers).
    with hk.custom_creator(registry._zeros_creator):  # pylint: disable=protected-access
      out = M.build(name, num_classes=10)(images, False)['logits']
    logits.append(jax.ShapeDtypeStruct(out.shape, out.dtype))

  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.bfloat16)
  params = jax.eval_shape(hk.transform(forward).init, jax.random.PRNGKey(0), x)
  assert logits == [jax.ShapeDtypeStruct((2, 10), jnp.float32)]
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))


def test_full_f0_forward_and_gradients():
  fwd = M.forward_fn('F0', num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  # Random values over the exact tree (drawn by numpy: compiling F0's
  # initialisers would double this test's time), skip gains non-zero so that
  # every residual branch receives gradient.
  params = random_tree(M.param_shapes('F0', 10))
  labels = jnp.array([1, 2])

  def loss(p):
    logits = fwd.apply(p, jax.random.PRNGKey(2), x, True)['logits']
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
  for mod in ('NFNet/~/stem_conv0', 'NFNet/~/nf_block_5/~/conv1b',
              'NFNet/~/linear'):
    assert float(jnp.abs(grads[mod]['w']).sum()) > 0, mod


def test_eval_is_deterministic_and_dropout_active_in_training():
  fwd = M.forward_fn('F0', num_classes=5, drop_rate=0.5, **_tiny('F0'))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  params = jax.jit(fwd.init, static_argnums=2)(jax.random.PRNGKey(1), x, True)
  params['NFNet/~/linear']['w'] += 1.0
  apply = jax.jit(fwd.apply, static_argnums=3)
  a = apply(params, None, x, False)['logits']
  np.testing.assert_array_equal(a, apply(params, None, x, False)['logits'])
  t1 = apply(params, jax.random.PRNGKey(3), x, True)['logits']
  t2 = apply(params, jax.random.PRNGKey(4), x, True)['logits']
  assert not np.allclose(t1, t2)


def test_classifier_init_zero_mean_small():
  fwd = M.forward_fn('F0', num_classes=1000, **_tiny('F0'))
  params = jax.jit(fwd.init, static_argnums=2)(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)
  w = np.asarray(params['NFNet/~/linear']['w'])
  assert abs(w.std() - 0.01) < 0.001 and abs(w.mean()) < 0.001
  np.testing.assert_array_equal(params['NFNet/~/linear']['b'], 0)


@pytest.mark.parametrize('bad', ['F9', 'nfnet_f10', 'resnet50', ''])
def test_unknown_name_lists_valid_names(bad):
  with pytest.raises(ValueError, match=r'Unknown model.*Valid names: F0'):
    M.build(bad)


def test_name_aliases_and_table():
  assert M.get_variant('f3+').name == 'F3+'
  assert M.get_variant('nfnet_f1').name == 'F1'
  spec = M.get_variant('F0')
  assert (spec.train_size, spec.test_size, spec.randaug, spec.dropout) == (
      192, 256, '405', 0.2)
  assert M.get_variant('F7').depth == (8, 16, 48, 24)
  assert M.get_variant('F2+').width == (384, 768, 2048, 2048)
  assert len([v for v in M.variants() if v.startswith('F')]) == 16


def test_narrow_width_does_not_crash():
  # The original release crashed for width < 0.5 (zero groups).
  fwd = M.forward_fn('F0', num_classes=3, width=0.25)
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(lambda k: fwd.init(k, x, False),
                          jax.random.PRNGKey(0))
  out = jax.eval_shape(lambda p: fwd.apply(p, None, x, False), params)
  assert out['logits'].shape == (1, 3)


def test_remat_keeps_params_outputs_and_gradients():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  fwds = [M.forward_fn('F0', num_classes=4, remat=r, **_tiny('F0'))
          for r in (False, True)]
  params = jax.jit(fwds[0].init, static_argnums=2)(jax.random.PRNGKey(1), x,
                                                   True)
  assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
      lambda k: fwds[1].init(k, x, True), jax.random.PRNGKey(1)))
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if 'skip_gain' in jax.tree_util.keystr(p) else v,
      params)

  def grads(fwd):
    loss = lambda p: jnp.sum(fwd.apply(p, jax.random.PRNGKey(2), x,
                                       True)['logits'] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = grads(fwds[0]), grads(fwds[1])
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6), g0, g1)


# NF-ResNet / NF-RegNet trees in DeepMind's naming: tests/release_trees.py.


def _ours(name, num_classes):
  return {path: {k: tuple(v.shape) for k, v in leaves.items()}
          for path, leaves in M.param_shapes(name, num_classes).items()}


@pytest.mark.parametrize('name,widths,depth', [
    ('nf_regnet_b0', (48, 104, 208, 440), (1, 3, 6, 6)),
    ('nf_regnet_b5', (80, 168, 336, 704), (3, 7, 14, 14)),
])
def test_nf_regnet_tree_matches_release_naming(name, widths, depth):
  expected = release_trees.regnet_tree(widths, depth, 17)
  ours = _ours(name, 17)
  assert sorted(ours) == sorted(expected)
  for path in expected:
    assert ours[path] == expected[path], path


@pytest.mark.parametrize('name,depth,use_se', [
    ('nf_resnet50', (3, 4, 6, 3), False),
    ('nf_seresnet101', (3, 4, 23, 3), True),
])
def test_nf_resnet_tree_matches_release_naming(name, depth, use_se):
  expected = release_trees.resnet_tree(depth, use_se, 17)
  ours = _ours(name, 17)
  assert sorted(ours) == sorted(expected)
  for path in expected:
    assert ours[path] == expected[path], path


def test_resnet_and_regnet_classifier_init_as_release():
  # NF_ResNet: N(0, 0.01) (fc_init=None); NF_RegNet: zeros (fc_init=jnp.zeros).
  x = jnp.zeros((1, 32, 32, 3))
  p = jax.jit(M.forward_fn('nf_resnet26', 1000, **_tiny('nf_resnet26')).init,
              static_argnums=2)(jax.random.PRNGKey(0), x, False)
  w = np.asarray(p['NF_ResNet/~/linear']['w'])
  assert w.shape == (256, 1000)
  assert abs(w.std() - 0.01) < 0.0005 and abs(w.mean()) < 0.0005
  np.testing.assert_array_equal(p['NF_ResNet/~/linear']['b'], 0)
  p = jax.jit(M.forward_fn('nf_regnet_b0', 1000,
                           **_tiny('nf_regnet_b0')).init,
              static_argnums=2)(jax.random.PRNGKey(0), x, False)
  np.testing.assert_array_equal(p['NF_RegNet/~/linear']['w'], 0)


@pytest.mark.parametrize('width', [0.25, 0.5, 2.0])
def test_width_multiplier_scales_stages_not_the_nfnet_stem(width):
  # As the release: NFNet's stem is 16, 32, 64, stage-0 width / 2 whatever
  # `width`; the stage widths (and so the final conv) are scaled.
  s = M.param_shapes('F0', 10, width=width)
  assert s['NFNet/~/stem_conv3']['w'].shape == (3, 3, 64, 128)
  assert s['NFNet/~/nf_block/~/conv0']['w'].shape[2] == 128
  assert s['NFNet/~/nf_block/~/conv2']['w'].shape[-1] == int(256 * width)
  assert s['NFNet/~/final_conv']['w'].shape[-1] == 2 * int(1536 * width)
  # NF-ResNet / NF-RegNet scale their stems with the widths (release too).
  r = M.param_shapes('nf_resnet50', 10, width=width)
  assert r['NF_ResNet/~/initial_conv']['w'].shape[-1] == int(64 * width)
  g = M.param_shapes('nf_regnet_b0', 10, width=width)
  assert g['NF_RegNet/~/initial_conv']['w'].shape[-1] == int(48 * width)


@pytest.mark.parametrize('name', ['F0', 'nf_resnet26', 'nf_regnet_b0'])
@pytest.mark.parametrize('rate', [-0.1, 1.5])
def test_stochdepth_rate_outside_unit_interval_is_rejected(name, rate):
  with pytest.raises(ValueError, match=r'stochdepth_rate must be in \[0, 1\]'):
    M.param_shapes(name, 10, stochdepth_rate=rate)


@pytest.mark.parametrize('cls,bad,family', [
    (M.NFNet, 'nf_resnet50', 'NFNet'), (M.NFResNet, 'F0', 'NF-ResNet'),
    (M.NFRegNet, 'nf_resnet50', 'NF-RegNet'), (M.NFNetL, 'F0', 'NFNet-L')])
def test_family_rejects_other_families_variants(cls, bad, family):
  import haiku as hk
  with pytest.raises(ValueError, match=f'Unknown {family} variant.*valid: '):
    hk.transform(lambda: cls(variant=bad)).init(None)


def test_import_nfnets_does_not_import_jax():
  import subprocess
  import sys
  # The README's uses: nfnets.runtime before JAX starts, then nfnets.models,
  # nfnets.adaptive_grad_clip, nfnets.checkpoints.
  code = ('import nfnets, sys; assert "jax" not in sys.modules; '
          'assert callable(nfnets.runtime.configure_cpu_runtime); '
          'assert "jax" not in sys.modules; '
          'm = nfnets.models; assert "jax" in sys.modules; '
          'assert callable(nfnets.adaptive_grad_clip); '
          'assert nfnets.checkpoints.__name__ == "nfnets.checkpoints"')
  subprocess.run([sys.executable, '-c', code], check=True)
