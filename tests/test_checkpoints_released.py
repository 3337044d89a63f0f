"""Released-format loading: bit-for-bit, variant inference, clear failures."""
import os
import re

import dill
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nfnets.checkpoints as C
import nfnets.models as M
import release_trees

TINY = dict(width=0.125, depth=(1, 1, 1, 1), group_size=16)


def random_tree(shapes, seed=0):
  """Random values over an exact Haiku params tree (all leaves non-trivial,
  including skip gains, so every block contributes to the output)."""
  rng = np.random.default_rng(seed)
  out = {}
  for module, sub in shapes.items():
    out[module] = {}
    for name, s in sub.items():
      scale = 0.5 if name in ('skip_gain', 'gain') else 0.1
      v = rng.standard_normal(s.shape, dtype=np.float32) * scale
      if name == 'gain':
        v += 1.0
      out[module][name] = v.astype(s.dtype)
  return out


def write_released(params, path):
  """The released format: a dill pickle of the Haiku params dict."""
  with open(path, 'wb') as f:
    dill.dump(params, f)
  return str(path)


@pytest.fixture(scope='module')
def f0(tmp_path_factory):
  params = random_tree(M.param_shapes('F0', 1000))
  path = write_released(params, tmp_path_factory.mktemp('f0') / 'F0_haiku.npz')
  return params, path


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  params = random_tree(M.param_shapes('F0', 1000, **TINY), seed=1)
  path = write_released(params, tmp_path_factory.mktemp('tiny') / 'tiny.npz')
  return params, path


def assert_trees_equal(a, b):
  assert set(a) == set(b)
  for m in a:
    assert set(a[m]) == set(b[m]), m
    for n in a[m]:
      x, y = np.asarray(a[m][n]), np.asarray(b[m][n])
      assert x.shape == y.shape and x.dtype == y.dtype, (m, n)
      assert np.array_equal(x, y), (m, n)


def test_released_f0_loads_bit_for_bit(f0):
  src, path = f0
  loaded = C.load_pretrained(path)  # variant inferred
  assert_trees_equal(src, loaded)
  assert all(type(v) is np.ndarray for d in loaded.values() for v in d.values())
  # 'native' grouped convs compile ~5x faster on CPU than 'split'; same
  # parameter tree and maths.
  fwd = M.forward_fn('F0', 1000, conv_lowering='xla')
  apply = jax.jit(lambda p, x: fwd.apply(p, None, x, False)['logits'])
  x = jnp.asarray(np.random.default_rng(0).standard_normal(
      (1, 32, 32, 3), dtype=np.float32))
  want = np.asarray(apply(jax.tree.map(jnp.asarray, src), x))
  got = np.asarray(apply(C.load_pretrained(path, 'F0', 1000), x))
  assert np.all(np.isfinite(want)) and np.abs(want).max() > 0
  assert np.array_equal(want, got)  # bit for bit


def test_variant_inferred_and_described(f0):
  src, _ = f0
  assert C.infer_variant(src) == 'F0'
  s = C.summarize(src)
  assert s.depths == (1, 2, 6, 3) and s.widths == (256, 512, 1536, 1536)
  assert s.num_classes == 1000
  for name in ('F1+', 'F6'):
    assert C.infer_variant(M.param_shapes(name, 10)) == name


def test_wrong_variant_says_which(f0):
  _, path = f0
  with pytest.raises(C.VariantMismatchError) as e:
    C.load_pretrained(path, variant='F1')
  msg = str(e.value)
  assert 'variant F1' in msg and 'looks like F0' in msg
  assert e.value.detected == 'F0' and e.value.requested == 'F1'
  assert 'NFNet/~/nf_block_12' in msg  # lists missing blocks by path


def test_shape_mismatch_lists_path(tiny, tmp_path):
  src, _ = tiny
  bad = {m: dict(d) for m, d in src.items()}
  bad['NFNet/~/nf_block_2/~/conv1'] = dict(bad['NFNet/~/nf_block_2/~/conv1'])
  bad['NFNet/~/nf_block_2/~/conv1']['w'] = np.zeros((3, 3, 8, 96), np.float32)
  bad['NFNet/~/final_conv'] = dict(bad['NFNet/~/final_conv'])
  bad['NFNet/~/final_conv']['bias'] = np.zeros(384, np.float64)
  del bad['NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1']
  bad['NFNet/~/extra'] = {'w': np.zeros(3, np.float32)}
  path = write_released(bad, tmp_path / 'bad.npz')
  with pytest.raises(C.ParamMismatchError) as e:
    C.load_pretrained(path, 'F0', model_kwargs=TINY)
  msg = str(e.value)
  assert ('NFNet/~/nf_block_2/~/conv1:w: file has shape (3, 3, 8, 96), model '
          'expects (3, 3, 16, 96)') in msg
  assert 'NFNet/~/final_conv:bias: file has dtype float64' in msg
  assert re.search(r'missing \(2\):\n.*squeeze_excite/~/linear_1:b', msg)
  assert 'unexpected (1):\n    NFNet/~/extra:w' in msg
  assert not isinstance(e.value, C.VariantMismatchError)


def test_class_count_mismatch_points_to_merge(tiny):
  _, path = tiny
  with pytest.raises(C.ParamMismatchError, match='classifier has 1000 classes'
                     ' but 10 were requested'):
    C.load_pretrained(path, 'F0', num_classes=10, model_kwargs=TINY)


def test_truncated_file(f0, tiny, tmp_path):
  _, path = tiny
  data = open(path, 'rb').read()
  for cut in (len(data) // 2, 40, len(data) - 1):
    p = tmp_path / f'cut{cut}.npz'
    p.write_bytes(data[:cut])
    with pytest.raises(C.TruncatedCheckpointError, match='truncated'):
      C.load_pretrained(str(p), 'F0', model_kwargs=TINY)
  # A big released-size file cut mid-array.
  _, big = f0
  p = tmp_path / 'F0_cut.npz'
  with open(big, 'rb') as f:
    p.write_bytes(f.read(os.path.getsize(big) // 3))
  with pytest.raises(C.TruncatedCheckpointError,
                     match='truncated or is not a released NFNet checkpoint'):
    C.load_pretrained(str(p))
  empty = tmp_path / 'empty.npz'
  empty.write_bytes(b'')
  with pytest.raises(C.TruncatedCheckpointError, match='empty'):
    C.load_pretrained(str(empty))
  text = tmp_path / 'page.npz'
  text.write_bytes(b'<html>404 Not Found</html>')
  with pytest.raises(C.TruncatedCheckpointError, match='not a released'):
    C.load_pretrained(str(text))


def test_not_a_params_dict(tmp_path):
  p = tmp_path / 'list.pkl'
  p.write_bytes(dill.dumps([np.zeros(3)]))
  with pytest.raises(C.CheckpointError, match='not a Haiku params dict'):
    C.read_params(str(p))


def test_npz_round_trip(tiny, tmp_path):
  src, _ = tiny
  path = C.save_npz(src, str(tmp_path / 'tiny_safe.npz'))
  with np.load(path, allow_pickle=False) as z:  # no pickles inside
    assert 'NFNet/~/stem_conv0:w' in z.files
    assert str(z['__format__']) == C.NPZ_FORMAT
  assert_trees_equal(src, C.load_pretrained(path, 'F0', model_kwargs=TINY))
  # Truncated npz.
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(open(path, 'rb').read()[:1000])
  with pytest.raises(C.TruncatedCheckpointError, match='truncated'):
    C.read_params(str(cut))


def test_npz_with_object_arrays_is_refused(tmp_path):
  p = tmp_path / 'obj.npz'
  np.savez(p, **{'NFNet/~/linear:w': np.array([None, 1], dtype=object)})
  with pytest.raises(C.UnsafeCheckpointError, match='pickled object arrays'):
    C.read_params(str(p))


def test_unknown_tree_needs_variant(tiny):
  _, path = tiny
  with pytest.raises(C.CheckpointError, match='Cannot infer the variant'):
    C.load_pretrained(path)


def test_merge_into_resets_classifier(tiny):
  _, path = tiny
  loaded = C.load_pretrained(path, 'F0', model_kwargs=TINY)
  init = random_tree(M.param_shapes('F0', 10, **TINY), seed=7)
  merged = C.merge_into(init, loaded)
  assert merged['NFNet/~/linear']['w'].shape == (384, 10)
  assert merged['NFNet/~/linear']['w'] is init['NFNet/~/linear']['w']
  for m in merged:
    if m != 'NFNet/~/linear':
      for n in merged[m]:
        assert np.array_equal(merged[m][n], loaded[m][n])
  with pytest.raises(C.ParamMismatchError) as e:
    C.merge_into(init, loaded, reset=None)
  assert 'NFNet/~/linear:w: checkpoint has shape (384, 1000), model expects ' \
         '(384, 10)' in str(e.value)
  with pytest.raises(C.ParamMismatchError, match='matches no module'):
    C.merge_into(init, loaded, reset='^nothing$')
  bigger = random_tree(M.param_shapes('F0', 10, width=0.25,
                                      depth=(1, 1, 1, 1), group_size=16))
  with pytest.raises(C.ParamMismatchError, match='mis-shaped'):
    C.merge_into(bigger, loaded)
  mask = C.trainable_mask(init)
  assert mask['NFNet/~/linear'] == {'w': True, 'b': True}
  assert not any(v for m, d in mask.items() if m != 'NFNet/~/linear'
                 for v in d.values())


def test_init_from_checkpoint(tiny):
  src, path = tiny
  init = random_tree(M.param_shapes('F0', 5, **TINY), seed=3)
  merged = C.init_from_checkpoint(init, path, variant='F0', model_kwargs=TINY)
  assert np.array_equal(merged['NFNet/~/stem_conv0']['w'],
                        src['NFNet/~/stem_conv0']['w'])
  assert merged['NFNet/~/linear']['b'].shape == (5,)


def test_own_training_checkpoint_ema_and_raw(tiny, tmp_path):
  """Reads the training loop's orbax checkpoints (workdir, checkpoints/ dir
  or step dir), raw or EMA params, and validates them."""
  from nfnets.checkpoints import run  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from nfnets.training import state as state_lib  # pylint: disable=g-import-not-at-top
  src, _ = tiny
  ema = jax.tree.map(lambda v: v * 0.5, src)
  state = state_lib.create(src, optax.sgd(0.1))._replace(ema_params=ema)
  ckpt = run.RunCheckpointer(str(tmp_path), async_save=False)
  ckpt.save(7, state, {'model': 'F0', 'num_classes': 1000})
  ckpt.close()
  for path in (tmp_path, tmp_path / 'checkpoints', tmp_path / 'checkpoints/7'):
    assert_trees_equal(src, C.load_pretrained(str(path), 'F0', which='raw',
                                              model_kwargs=TINY))
  assert_trees_equal(ema, C.load_pretrained(str(tmp_path), 'F0',
                                            model_kwargs=TINY))
  with pytest.raises(C.ParamMismatchError,
                     match=r'the file has .*blocks per stage \(1, 1, 1, 1\)'):
    C.load_pretrained(str(tmp_path), 'F0')  # default F0 != the tiny model


@pytest.mark.parametrize('name,family_tree', [
    ('nf_regnet_b0', lambda: release_trees.regnet_tree(
        (48, 104, 208, 440), (1, 3, 6, 6), 17)),
    ('nf_resnet50', lambda: release_trees.resnet_tree((3, 4, 6, 3), False, 17)),
])
def test_deepmind_named_nf_regnet_and_nf_resnet_trees_load(
    tmp_path, name, family_tree):
  """A params file in DeepMind's naming for these families (the tree built
  from the release's module names and arithmetic, independently of our
  models) loads without renaming, with the variant inferred."""
  rng = np.random.default_rng(3)
  src = {m: {n: rng.standard_normal(s).astype(np.float32) * 0.1
             for n, s in sub.items()} for m, sub in family_tree().items()}
  path = write_released(src, tmp_path / f'{name}.npz')
  assert C.infer_variant(src) == name
  loaded = C.load_pretrained(path)
  assert_trees_equal(src, loaded)
