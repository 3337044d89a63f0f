"""FLOP counting as in the paper: multiply-adds of convolutions and dense layers.

The model is traced (jax.make_jaxpr, no weights materialised) and every
conv_general_dilated and dot_general in the forward pass is counted:
output elements x (multiply-adds per output element). Weight standardisation,
activations, pooling and elementwise ops are not counted.
"""
import math

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from nfnets.models import registry


def _subjaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (list, tuple)) else (v,)
    for p in vals:
      if isinstance(p, jex_core.ClosedJaxpr):
        yield p.jaxpr
      elif isinstance(p, jex_core.Jaxpr):
        yield p


def jaxpr_macs(jaxpr) -> int:
  """Multiply-adds of the convs and dot products in a jaxpr (recursively)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out = eqn.outvars[0].aval.shape
      out_feat = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += math.prod(out) * math.prod(rhs) // out_feat
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in lhs_contract)
    for sub in _subjaxprs(eqn):
      total += jaxpr_macs(sub)
  return total


def count_flops(name: str, image_size=None, num_classes: int = 1000,
                **overrides) -> int:
  """Multiply-adds of one forward pass on one image (the paper's 'FLOPs').

  Args:
    name: model variant.
    image_size: input resolution; defaults to the variant's test size.
    num_classes: classifier outputs.
    **overrides: passed to `nfnets.models.build`, except conv_lowering,
      which may be given but is always 'xla' here: the FLOPs are the model's,
      read from the plain lowering's jaxpr (the 'cpu' lowering adds products
      for the weight standardisation sums).
  """
  if image_size is None:
    image_size = registry.get_variant(name).test_size
  overrides.pop('conv_lowering', None)  # the lowerings share one tree
  params = registry.param_shapes(name, num_classes, **overrides)
  fwd = registry.forward_fn(name, num_classes, conv_lowering='xla',
                            **overrides)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p, x: fwd.apply(p, None, x, False))(params, x)
  return jaxpr_macs(jaxpr.jaxpr)
