"""One entry point for every model family: build(name, num_classes, **overrides)."""
import difflib
import functools
from typing import Dict, List

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models.layers import FeatureInfo
from nfnets.models.nf_regnet import NFRegNet
from nfnets.models.nf_resnet import NFResNet
from nfnets.models.nf_resnet_timm import TimmNFResNet
from nfnets.models.nfnet import NFNet
from nfnets.models.nfnet_l import NFNetL
from nfnets.models.variants import VARIANTS, VariantSpec

_FAMILIES = {'nfnet': NFNet, 'nf_resnet': NFResNet, 'nf_regnet': NFRegNet,
             'nfnet_l': NFNetL, 'nf_resnet_timm': TimmNFResNet}


def variants() -> List[str]:
  """All names accepted by `build`."""
  return list(VARIANTS)


def _canonical(name: str) -> str:
  if name in VARIANTS:
    return name
  key = name.strip()
  if key.upper() in VARIANTS:  # 'f0' -> 'F0', 'f3+' -> 'F3+'
    return key.upper()
  low = key.lower().replace('-', '_')
  for prefix in ('nfnet_', 'nfnet'):  # 'nfnet_f0' -> 'F0'
    if low.startswith(prefix) and low[len(prefix):].upper() in VARIANTS:
      return low[len(prefix):].upper()
  if low in VARIANTS:
    return low
  close = difflib.get_close_matches(name, list(VARIANTS), n=3)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise ValueError(f'Unknown model {name!r}.{hint} Valid names: '
                   f'{", ".join(VARIANTS)}.')


def get_variant(name: str) -> VariantSpec:
  """The table row (widths, depths, image sizes, RandAugment, dropout)."""
  return VARIANTS[_canonical(name)]


def build(name: str, num_classes: int = 1000, **overrides) -> hk.Module:
  """Builds the Haiku module for `name` (call inside hk.transform).

  Args:
    name: a variant name (see `variants()`), e.g. 'F0', 'F3+', 'nf_resnet50',
      'nf_seresnet101', 'nf_regnet_b2'. Case-insensitive for F-variants.
    num_classes: classifier outputs.
    **overrides: keyword arguments of the family's constructor (width, depth,
      stochdepth_rate, drop_rate, activation, conv_lowering, remat, ...).
      conv_lowering: None (the backend's default: 'cpu' on the CPU backend,
      'xla' elsewhere), 'xla' or 'cpu'; every family accepts it.
  Returns:
    A module called as model(images, is_training) -> {'logits', 'pool', ...}.
  """
  spec = get_variant(name)
  return _FAMILIES[spec.family](num_classes=num_classes, variant=spec.name,
                                **overrides)


def forward_fn(name: str, num_classes: int = 1000,
               **overrides) -> hk.Transformed:
  """hk.transform of `build(...)(images, is_training)`."""
  def fwd(images, is_training=True, return_metrics=False,
          return_features=False):
    return build(name, num_classes, **overrides)(
        images, is_training, return_metrics, return_features=return_features)
  return hk.transform(fwd)


def feature_info(name: str, **overrides) -> Dict[str, FeatureInfo]:
  """Channels and stride of each map `model(x, ..., return_features=True)`
  returns under 'features': {'stem', 'stage1'..'stage4', 'final'}.

  A map of stride s is ceil(H / s) x ceil(W / s) for an H x W input (any
  size; see the family's __call__). Builds no weights.

  Args:
    name: a variant name (see `variants()`).
    **overrides: the same constructor overrides as `build` (width, depth...).
  """
  return hk.transform(lambda: build(name, 1, **overrides).feature_info).apply(
      {}, None)


def init_params(forward: hk.Transformed, rng: jax.Array, images: jax.Array,
                is_training: bool = True) -> Dict[str, Dict[str, np.ndarray]]:
  """forward.init(rng, images, is_training), jitted, as host numpy.

  On XLA:CPU the initialisers (one RNG per parameter) are compiled without
  the backend's optimisations: they run once, and optimising them took most
  of a small model's compile time (docs/benchmarking.md). Values agree with
  a default compilation to float32 rounding (~1e-7).
  """
  lowered = jax.jit(lambda r, x: forward.init(r, x, is_training)).lower(
      rng, images)
  options = None
  if jax.default_backend() == 'cpu':
    options = {'xla_backend_optimization_level': 0,
               'xla_llvm_disable_expensive_passes': True}
  return jax.device_get(lowered.compile(options)(rng, images))


def param_shapes(name: str, num_classes: int = 1000, image_size: int = 32,
                 **overrides) -> Dict[str, Dict[str, jax.ShapeDtypeStruct]]:
  """The parameter tree's shapes, without materialising any weights.

  Tracing a full-size model takes a second or more, and count_params,
  count_flops and the checkpoint loaders ask for the same trees: the last
  few are remembered (a fresh dict is returned each time).
  """
  key = (name, num_classes, image_size, tuple(sorted(overrides.items())))
  try:
    hash(key)
  except TypeError:  # an unhashable override value (a list): not remembered
    return _trace_param_shapes(*key)
  return {module: dict(leaves)
          for module, leaves in _remembered_param_shapes(*key).items()}


def _zeros_creator(next_creator, shape, dtype, init, context):
  """Every parameter as zeros: only shapes and dtypes are wanted, and the
  initialisers (truncated normals) are a large part of a full trace."""
  del init, context
  return next_creator(shape, dtype, jnp.zeros)


def _trace_param_shapes(name, num_classes, image_size, overrides):
  def init_shapes(images):
    with hk.custom_creator(_zeros_creator):
      return build(name, num_classes, **dict(overrides))(images, False)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(hk.transform(init_shapes).init,
                        jax.random.PRNGKey(0), x)


_remembered_param_shapes = functools.lru_cache(maxsize=16)(_trace_param_shapes)


def count_params(name: str, num_classes: int = 1000, **overrides) -> int:
  """Number of parameters, computed with jax.eval_shape."""
  shapes = param_shapes(name, num_classes, **overrides)
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
