"""Export a trained NFNet-family model for serving: StableHLO, SavedModel, ONNX.

>>> from nfnets.export import export
>>> export('F0_safe.npz', format='onnx', out_path='f0.onnx')   # doctest: +SKIP

Every format serves the same inference function (see `serving_fn`):

* input ``images``: float32 ``[batch, size, size, 3]``, RGB, NHWC, on the
  0..255 scale (decoded pixels, resized / centre-cropped to ``size`` by the
  client, e.g. as ``scripts/eval.py`` does: resize to size + 32, centre crop);
  the batch dimension is symbolic, ``size`` is fixed at export (default: the
  variant's test resolution). The ImageNet mean / std normalisation used in
  training (``nfnets.data.preprocess``) happens inside, so clients send
  pixels, not normalised tensors. uint8 pixels cast to float32 are valid input.
* output ``logits``: float32 ``[batch, num_classes]`` (inference mode: no
  dropout, no stochastic depth); ``num_classes`` is the checkpoint's.

Weight standardisation is folded: the standardised kernels
(``WSConv2D.standardize``) are computed once at export, and the exported
function uses them directly (through ``nfnets.models.kernel_hook``); the raw
``w`` and ``gain`` of the convolutions are not shipped.

Formats: ``'stablehlo'`` (``jax.export``, serialized; reload with
``load_stablehlo`` / ``jax.export.deserialize``; lowered for CPU and CUDA
by default; weights embedded as constants), ``'savedmodel'`` (TensorFlow via
``jax2tf``; weights as ``tf.Variable``s, signature ``serving_default``) and
``'onnx'`` (``jax2onnx``, optional extra ``pip install nfnets[onnx]``; weights
as initializers, large ones in a ``.onnx.data`` sidecar). Each export also
writes a JSON description (``<out>.json``, or ``export_info.json`` inside a
SavedModel directory).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import models

FORMATS = ('stablehlo', 'savedmodel', 'onnx')
STABLEHLO_PLATFORMS = ('cpu', 'cuda')
Params = Mapping[str, Mapping[str, Any]]
INPUT_CONTRACT = ('float32 [batch, size, size, 3] RGB NHWC pixels on the '
                  '0..255 scale (normalised inside); output float32 logits '
                  '[batch, num_classes]')


def _model_kwargs(model_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
  """Export default: the 'xla' lowering (one convolution op per layer,
  grouped natively), which every target (TF, ONNX Conv's `group`) maps."""
  kwargs = dict(model_kwargs or {})
  kwargs.setdefault('conv_lowering', 'xla')
  if 'depth' in kwargs and kwargs['depth'] is not None:
    kwargs['depth'] = tuple(kwargs['depth'])
  return kwargs


def _num_classes(params: Params) -> int:
  from nfnets.checkpoints import summarize  # pylint: disable=g-import-not-at-top
  n = summarize(params).num_classes
  if n is None:
    raise ValueError('export: the params have no classifier (no root-level '
                     "'linear' module); pass a full model's params.")
  return int(n)


def fold_weight_standardization(forward: hk.Transformed, params: Params,
                                image_size: int) -> Dict[str, Dict[str, Any]]:
  """Params with every WSConv2D's 'w'/'gain' replaced by its standardised
  kernel 'w' (its 'bias' kept); other modules unchanged. Computed once,
  as numpy arrays (one jit of the model, whose convolutions XLA drops)."""
  def kernels(p, x):
    out = {}

    def record(module, w, gain, standardize):
      out[module.module_name] = standardize(w, gain)
      return out[module.module_name]
    with models.kernel_hook(record):
      forward.apply(p, None, x, False)
    return out
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  ks = jax.jit(kernels).lower(params, dummy).compile()(
      params, jnp.zeros(dummy.shape, dummy.dtype))
  folded = {}
  for module, leaves in params.items():
    leaves = {k: np.asarray(v) for k, v in leaves.items()}
    if module in ks:
      leaves = {'w': np.asarray(ks[module], np.float32), 'bias': leaves['bias']}
    folded[module] = leaves
  return folded


def serving_fn(forward: hk.Transformed, serving_params: Params,
               *, folded: bool = True) -> Callable[[Any, jax.Array], jax.Array]:
  """``f(params, images) -> logits``, the exported inference function.

  Args:
    forward: the model's ``hk.transform`` (``models.forward_fn``).
    serving_params: ``fold_weight_standardization``'s output (or the raw
      params when ``folded=False``, e.g. to compare against).
    folded: whether conv kernels in ``serving_params`` are already
      standardised (the hook then returns them as they are).
  Returns:
    A function of (params tree of ``serving_params``' structure, float32
    0..255 images [B, H, W, 3]) -> float32 logits [B, num_classes].
  """
  from nfnets.data.preprocess import MEAN_RGB, STDDEV_RGB  # pylint: disable=g-import-not-at-top
  mean = np.asarray(MEAN_RGB, np.float32)
  std = np.asarray(STDDEV_RGB, np.float32)
  # Unused placeholders for the gains Haiku's get_parameter still asks for:
  # numpy, never touched by an op, so they are not part of any export.
  gains = {m: np.ones(v['w'].shape[-1], np.float32)
           for m, v in serving_params.items()
           if folded and 'gain' not in v and np.ndim(v.get('w')) == 4}

  def apply(params, images):
    full = {m: (dict(v, gain=gains[m]) if m in gains else v)
            for m, v in params.items()}
    x = (images.astype(jnp.float32) - mean) / std
    if not folded:
      return forward.apply(full, None, x, False)['logits']
    with models.kernel_hook(lambda module, w, gain, standardize: w):
      return forward.apply(full, None, x, False)['logits'].astype(jnp.float32)
  return apply


def _write_info(path: str, info: Mapping[str, Any]) -> None:
  with open(path, 'w') as f:
    json.dump(info, f, indent=1, default=str)


def _export_stablehlo(fn, params, spec, out_path: str,
                      platforms: Sequence[str]) -> None:
  exported = jax.export.export(jax.jit(lambda x: fn(params, x)),
                               platforms=tuple(platforms))(spec)
  with open(out_path, 'wb') as f:
    f.write(exported.serialize())


def load_stablehlo(path: str) -> jax.export.Exported:
  """Reads a StableHLO export; call it as ``load_stablehlo(p).call(images)``."""
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def _export_savedmodel(fn, params, image_size: int, out_path: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(params)
  module = tf.Module()
  module.weights = [tf.Variable(x, trainable=False) for x in leaves]
  converted = jax2tf.convert(
      lambda ws, x: fn(jax.tree.unflatten(treedef, ws), x),
      polymorphic_shapes=[None, '(b, ...)'], with_gradient=False)

  @tf.function(autograph=False, input_signature=[tf.TensorSpec(
      [None, image_size, image_size, 3], tf.float32, name='images')])
  def serve(images):
    return {'logits': converted(module.weights, images)}
  module.serve = serve
  tf.saved_model.save(module, out_path,
                      signatures={'serving_default': serve})


def _export_onnx(fn, params, spec, out_path: str) -> None:
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("format='onnx' needs jax2onnx (and onnxruntime to "
                      "check it): pip install 'nfnets[onnx]'.") from e
  jax2onnx.to_onnx(lambda x: fn(params, x), [spec], model_name='nfnet',
                   input_names=['images'], output_names=['logits'],
                   return_mode='file', output_path=out_path)


def run_exported(path: str, format: str, images: np.ndarray) -> np.ndarray:
  """Runs an export on ``images`` (float32 0..255 [B, H, W, 3]) with the
  format's own runtime (jax.export / TensorFlow / onnxruntime): logits."""
  images = np.asarray(images, np.float32)
  if format == 'stablehlo':
    return np.asarray(load_stablehlo(path).call(jnp.asarray(images)))
  if format == 'savedmodel':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    serve = tf.saved_model.load(path).signatures['serving_default']
    return serve(images=tf.constant(images))['logits'].numpy()
  if format == 'onnx':
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # no 'unused initializer' warnings
    session = ort.InferenceSession(path, opts,
                                   providers=['CPUExecutionProvider'])
    return session.run(['logits'], {'images': images})[0]
  raise ValueError(f'format must be one of {FORMATS}, got {format!r}.')


def _run_config_model(path) -> tuple[Optional[str], Optional[Dict[str, Any]]]:
  """(model name, constructor overrides) from the config.json of the
  training workdir holding ``path`` (workdir, checkpoints/ or a step dir),
  or (None, None) when there is none."""
  path = os.path.abspath(os.fspath(path))
  for _ in range(3):
    config = os.path.join(path, 'config.json')
    if os.path.isfile(config):
      with open(config) as f:
        model = json.load(f).get('model', {})
      return model.get('name'), {k: v for k, v in model.get(
          'kwargs', {}).items() if v is not None}
    path = os.path.dirname(path)
  return None, None


def _load(checkpoint_or_params, variant, model_kwargs, which):
  if isinstance(checkpoint_or_params, Mapping):
    params = {m: dict(v) for m, v in checkpoint_or_params.items()}
    if variant is None:
      from nfnets.checkpoints import infer_variant  # pylint: disable=g-import-not-at-top
      variant = infer_variant(params)
  else:
    from nfnets import checkpoints  # pylint: disable=g-import-not-at-top
    params = checkpoints.load_pretrained(
        checkpoint_or_params, variant, which=which,
        model_kwargs={k: v for k, v in model_kwargs.items()
                      if k != 'conv_lowering'})
    variant = variant or checkpoints.infer_variant(params)
  if variant is None:
    raise ValueError('export: cannot infer the variant from the params; pass '
                     "variant= (e.g. 'F0') and model_kwargs= for non-default "
                     'models.')
  return params, variant


def export(checkpoint_or_params: Union[str, os.PathLike, Params],
           variant: Optional[str] = None, format: str = 'stablehlo',  # pylint: disable=redefined-builtin
           out_path: Optional[str] = None, *,
           image_size: Optional[int] = None,
           model_kwargs: Optional[Mapping[str, Any]] = None,
           which: str = 'ema', fold: bool = True,
           platforms: Sequence[str] = STABLEHLO_PLATFORMS,
           verify: bool = True, rtol: float = 1e-4) -> str:
  """Exports a model for serving (see the module docstring for the contract).

  Args:
    checkpoint_or_params: anything ``nfnets.checkpoints.load_pretrained``
      reads (released file, our .npz / orbax file, a training workdir), or a
      Haiku params tree.
    variant: model name (e.g. 'F0'); None -> inferred from the weights.
    format: 'stablehlo', 'savedmodel' or 'onnx'.
    out_path: the file (stablehlo, onnx) or directory (savedmodel) to write.
    image_size: the fixed input resolution; None -> the variant's test size.
    model_kwargs: constructor overrides the weights were trained with (e.g.
      width, depth); conv_lowering defaults to 'xla' for export. For a
      training workdir, None takes variant and overrides from its
      config.json.
    which: 'ema' or 'raw' params of our run checkpoints.
    fold: fold weight standardisation (default; False exports the raw
      kernels and standardises them in every call, for comparison only).
    platforms: 'stablehlo' only: the platforms the module is lowered for
      (any of 'cpu', 'cuda', 'rocm', 'tpu'); the default serves on CPU and
      NVIDIA GPUs, whatever machine exports.
    verify: run the export with its own runtime on 2 random images and
      check its logits against the Haiku model's (relative to their scale).
    rtol: tolerance of that check.
  Returns:
    out_path.
  """
  if format not in FORMATS:
    raise ValueError(f'export: format must be one of {FORMATS}, got '
                     f'{format!r}.')
  if not out_path:
    raise ValueError('export: pass out_path (a file, or a directory for '
                     "format='savedmodel').")
  if not isinstance(checkpoint_or_params, Mapping) and os.path.isdir(
      checkpoint_or_params):  # a workdir of ours: its model, unless given
    run_variant, run_kwargs = _run_config_model(checkpoint_or_params)
    variant = variant or run_variant
    model_kwargs = run_kwargs if model_kwargs is None else model_kwargs
  kwargs = _model_kwargs(model_kwargs)
  params, variant = _load(checkpoint_or_params, variant, kwargs, which)
  num_classes = _num_classes(params)
  image_size = int(image_size or models.get_variant(variant).test_size)
  forward = models.forward_fn(variant, num_classes, **kwargs)
  served = (fold_weight_standardization(forward, params, image_size)
            if fold else params)
  fn = serving_fn(forward, served, folded=fold)
  batch, = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  out_path = os.fspath(out_path)
  parent = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(parent, exist_ok=True)
  if format == 'stablehlo':
    _export_stablehlo(fn, served, spec, out_path, platforms)
  elif format == 'savedmodel':
    _export_savedmodel(fn, served, image_size, out_path)
  else:
    _export_onnx(fn, served, spec, out_path)
  if format == 'stablehlo':
    info_extra = dict(platforms=list(platforms))
  else:
    info_extra = {}
  info = dict(format=format, variant=variant, num_classes=num_classes,
              image_size=image_size, model_kwargs=kwargs, input=INPUT_CONTRACT,
              folded_weight_standardization=bool(fold), **info_extra)
  _write_info(os.path.join(out_path, 'export_info.json')
              if format == 'savedmodel' else out_path + '.json', info)
  if verify:
    check_export(out_path, format, forward, params, image_size, rtol)
  return out_path


def check_export(out_path: str, format: str, forward: hk.Transformed,  # pylint: disable=redefined-builtin
                 params: Params, image_size: int, rtol: float = 1e-4) -> float:
  """Max |exported - Haiku| / max |Haiku| logits on 2 random images; raises
  ValueError above ``rtol``."""
  rng = np.random.RandomState(0)
  images = rng.uniform(0, 255, (2, image_size, image_size, 3)).astype(
      np.float32)
  ref = np.asarray(jax.jit(serving_fn(forward, params, folded=False))(
      params, jnp.asarray(images)))
  got = run_exported(out_path, format, images)
  err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-6))
  if not err <= rtol:
    raise ValueError(f'export: the {format} export at {out_path} differs from '
                     f'the Haiku model by {err:.3g} (relative; limit {rtol:g}).')
  return err
