"""Adaptive Gradient Clipping (AGC) as an optax GradientTransformation.

Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization" (arXiv 2102.06171).
"""

from __future__ import annotations

import numbers
import re
from typing import (Any, Callable, Dict, List, Mapping, NamedTuple, Optional,
                    Sequence, Union)

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets.optim.masks import AGC_GROUPS, param_groups, path_to_str

PyTree = Any
Axes = Optional[tuple[int, ...]]
# A layout spec: None -> the default guess per leaf; an int / tuple of ints ->
# the same reduction axes for every leaf; a Mapping {regex: axes} -> the axes
# of the first regex found (re.search) in the leaf's path, default guess for
# leaves no regex matches; a callable (path: str, leaf) -> axes.  In every
# case ``axes`` is a tuple of reduction axes, or None for "the whole tensor".
UnitAxesSpec = Union[None, int, Sequence[int], Mapping[str, Any],
                     Callable[[str, Any], Axes]]

WHOLE = None  # readability alias for "one unit = the whole tensor"
_DIV_EPS = 1e-6  # guards g_norm in the division; distinct from `eps`.

_NO_PARAMS_MSG = (
    'adaptive_grad_clip needs the current parameters: the clipping threshold '
    'of each unit is clipping * max(||W_i||, eps), so call '
    '`tx.update(grads, opt_state, params)`; params=None was given.')


def default_unit_axes(path: str, leaf: Any) -> Axes:
  """Default layout guess (Haiku / channels-last conventions).

  * ``ndim <= 1`` (scalars such as ``skip_gain``, vectors such as gains and
    biases): one unit = the whole tensor (returns None).
  * ``ndim >= 2``: the *last* axis indexes output units, all other axes are
    reduced: linear ``[I, O]`` -> per output column, conv ``HWIO`` /
    ``WIO`` / ``DHWIO`` -> per output channel.

  Differences from ``optax.adaptive_grad_clip``'s guess: optax treats ``ndim
  == 3`` as a multi-head linear ``[I, H, D]`` (reduces axis 0 only) and
  treats any leaf that squeezes to <= 1 dims (e.g. ``[1, O]``) as a whole
  tensor.  For those layouts pass ``unit_axes`` explicitly.
  """
  del path
  ndim = jnp.ndim(leaf)
  if ndim <= 1:
    return None
  return tuple(range(ndim - 1))


def _normalise_axes(axes: Any, path: str, shape: tuple[int, ...]) -> Axes:
  """Validates an axes spec against a leaf; returns sorted positive axes."""
  if axes is None:
    return None
  if isinstance(axes, numbers.Integral):
    axes = (int(axes),)
  try:
    axes = tuple(axes)
  except TypeError:
    raise ValueError(
        f'adaptive_grad_clip: unit_axes for leaf {path!r} (shape {shape}) '
        f'must be None or a tuple of ints, got {axes!r}.') from None
  ndim = len(shape)
  out = []
  for a in axes:
    if not isinstance(a, numbers.Integral) or isinstance(a, bool):
      raise ValueError(
          f'adaptive_grad_clip: unit_axes for leaf {path!r} (shape {shape}) '
          f'must contain ints, got {axes!r}.')
    if not -ndim <= a < ndim:
      raise ValueError(
          f'adaptive_grad_clip: leaf {path!r} with shape {shape} '
          f'(ndim={ndim}) does not fit the stated unit layout: reduction '
          f'axes {axes} are out of range. State this leaf\'s layout '
          f'explicitly via unit_axes.')
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(
        f'adaptive_grad_clip: unit_axes {axes} for leaf {path!r} '
        f'(shape {shape}) has repeated axes.')
  return tuple(sorted(out))


def _make_resolver(unit_axes: UnitAxesSpec) -> Callable[[str, Any], Axes]:
  if unit_axes is None:
    return default_unit_axes
  if callable(unit_axes):
    return unit_axes
  if isinstance(unit_axes, Mapping):
    table = [(re.compile(k), v) for k, v in unit_axes.items()]

    def from_table(path, leaf):
      for regex, axes in table:
        if regex.search(path):
          return axes
      return default_unit_axes(path, leaf)
    return from_table
  if isinstance(unit_axes, jax.Array):
    raise TypeError(
        'adaptive_grad_clip: unit_axes is a JAX array, as '
        'optax.inject_hyperparams makes int arguments: pass a tuple instead '
        '(unit_axes=(0,), kept static) or use '
        "inject_hyperparams(adaptive_grad_clip, static_args='unit_axes').")
  if isinstance(unit_axes, np.ndarray) and unit_axes.ndim <= 1:
    unit_axes = tuple(int(a) for a in np.atleast_1d(unit_axes))
  if isinstance(unit_axes, (numbers.Integral, tuple, list)):
    fixed = unit_axes
    return lambda path, leaf: fixed
  raise TypeError(
      'adaptive_grad_clip: unit_axes must be None, an int or tuple of ints, '
      'a Mapping {path_regex: axes} or a callable (path, leaf) -> axes; got '
      f'{type(unit_axes).__name__}.')


@jax.custom_jvp
def _safe_sqrt(x):
  """sqrt whose derivative at 0 is 0 instead of inf (no NaN when AGC is
  differentiated through, e.g. for meta-gradients, with zero grads / zero-init
  params).  The forward pass is a plain sqrt (no extra ops)."""
  return jnp.sqrt(x)


@_safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = jnp.sqrt(x)
  pos = x > 0
  return y, jnp.where(pos, t * 0.5 / jnp.where(pos, y, 1.0), 0.0)


def _compute_dtype(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _sq(x: jax.Array) -> jax.Array:
  x = x.astype(_compute_dtype(x.dtype))
  if jnp.iscomplexobj(x):
    return jnp.real(x * jnp.conj(x))
  return x * x


def unitwise_norm(x: jax.Array, axes: Axes) -> jax.Array:
  """L2 norm of each unit in float32 (or wider), keepdims (broadcastable)."""
  return _safe_sqrt(jnp.sum(_sq(x), axis=axes, keepdims=True))


def _scale(g_sq: jax.Array, p_sq: jax.Array, clipping: Any,
           eps: Any) -> tuple[jax.Array, jax.Array]:
  """Per-unit factor from squared norms (1 below the threshold), and the
  boolean mask of the units that are clipped."""
  g_norm = _safe_sqrt(g_sq)
  max_norm = jnp.maximum(_safe_sqrt(p_sq), eps) * clipping
  clipped = g_norm > max_norm
  return jnp.where(clipped, max_norm / jnp.maximum(g_norm, _DIV_EPS),
                   1.0), clipped


def _unit_stats(scale: jax.Array, clipped: jax.Array) -> tuple[Any, ...]:
  """(units, units clipped, sum of factors) as float32 scalars, from the
  per-unit arrays the clipping computes anyway (no pass over G or W)."""
  f32 = jnp.float32
  return (jnp.asarray(scale.size, f32), jnp.sum(clipped, dtype=f32),
          jnp.sum(scale.astype(f32)))


def _apply_scale(g: jax.Array, scale: jax.Array) -> jax.Array:
  dtype = _compute_dtype(g.dtype)
  if dtype == g.dtype:
    return g * scale.astype(g.dtype)
  return (g.astype(dtype) * scale).astype(g.dtype)


def clip_leaf(g: jax.Array, p: jax.Array, axes: Axes, clipping: Any,
              eps: Any) -> jax.Array:
  """AGC on one leaf. Norms in float32; the result keeps ``g``'s dtype."""
  return _clip_leaf_stats(g, p, axes, clipping, eps)[0]


def _clip_leaf_stats(g, p, axes, clipping, eps):
  """(clipped g, units, units clipped, sum of factors) of one leaf."""
  scale, clipped = _scale(jnp.sum(_sq(g), axis=axes, keepdims=True),
                          jnp.sum(_sq(p), axis=axes, keepdims=True),
                          clipping, eps)
  return (_apply_scale(g, scale),) + _unit_stats(scale, clipped)


# Whole-tensor units (gains, biases, skip_gain: ~2/3 of NFNet's leaves) up to
# this many elements are clipped in groups: their squared norms are computed
# from one zero-padded [k, n] stack per (power-of-two length, dtype) bucket
# instead of ~8 tiny kernels per leaf.  Same arithmetic (zero padding does not
# change a sum of squares); it halves the number of kernels of an F0 update.
_GROUP_MAX_SIZE = 1 << 16


def _clip_leaves(gs, ps, axes_list, clipping, eps):
  """AGC over lists of leaves; small whole-tensor leaves are grouped.

  Returns a list of (clipped g, units, units clipped, sum of factors).
  """
  out = [None] * len(gs)
  buckets = {}
  for i, (g, p, axes) in enumerate(zip(gs, ps, axes_list)):
    whole = axes is None or len(axes) == g.ndim
    if whole and g.size <= _GROUP_MAX_SIZE and len(gs) > 1:
      n = 1 << max(0, int(g.size - 1).bit_length())
      key = (n, _compute_dtype(g.dtype), _compute_dtype(p.dtype))
      buckets.setdefault(key, []).append(i)
    else:
      out[i] = _clip_leaf_stats(g, p, axes, clipping, eps)
  for (n, _, _), idx in buckets.items():
    if len(idx) == 1:
      i = idx[0]
      out[i] = _clip_leaf_stats(gs[i], ps[i], None, clipping, eps)
      continue
    pad = lambda x: jnp.pad(x.astype(_compute_dtype(x.dtype)).reshape(-1),
                            (0, n - x.size))
    g_sq = jnp.sum(_sq(jnp.stack([pad(gs[i]) for i in idx])), axis=1)
    p_sq = jnp.sum(_sq(jnp.stack([pad(ps[i]) for i in idx])), axis=1)
    scale, clipped = _scale(g_sq, p_sq, clipping, eps)
    for j, i in enumerate(idx):
      out[i] = ((_apply_scale(gs[i], scale[j]),)
                + _unit_stats(scale[j], clipped[j]))
  return out


class AGCState(NamedTuple):
  """AGC's statistics of its last update: three trees of the params'
  structure (masked leaves absent) with one float32 scalar per leaf: its
  number of units, how many of them were clipped, and the sum of their clip
  factors (1 for a unit not clipped). Per leaf, so that sharded leaves'
  counts can be summed across devices before aggregating."""
  units: PyTree
  clipped: PyTree
  factor_sum: PyTree


def adaptive_grad_clip(clipping: Any,
                       eps: Any = 1e-3,
                       unit_axes: UnitAxesSpec = None,
                       stats: bool = True,
                       ) -> optax.GradientTransformation:
  r"""Adaptive Gradient Clipping (Brock et al., 2021), unit-wise.

  For each unit :math:`i` (an output channel of a conv kernel, an output
  column of a linear kernel, or the whole tensor for gains, biases and
  scalars) with gradient :math:`G_i` and parameter :math:`W_i`:

  .. math::

      G_i \leftarrow \begin{cases}
        \lambda \dfrac{\max(\|W_i\|_F, \epsilon)}{\|G_i\|_F} G_i
          & \text{if } \dfrac{\|G_i\|_F}{\max(\|W_i\|_F, \epsilon)} > \lambda \\
        G_i & \text{otherwise}
      \end{cases}

  with :math:`\lambda` = ``clipping``.  Norms are computed in float32 (also
  for bfloat16 / float16 gradients) and the result is cast back to the
  gradient's dtype; units below the threshold are returned bit-for-bit
  unchanged.  A zero gradient is never divided by (the denominator is
  ``max(||G_i||, 1e-6)``), so zero gradients stay zero, without NaN.

  **Where it goes in a chain.**  AGC must see the *raw gradients* of the
  full batch, *before* anything that rescales them and before the optimizer
  turns them into steps: i.e. after the cross-device ``pmean`` (clip the
  averaged gradient, as the paper does: clipping per-device shards would
  clip a different, noisier quantity and make the result depend on the
  device count), and first in the optax chain, before weight decay,
  momentum and the learning rate.  The bound it enforces,
  :math:`\|G_i\| \le \lambda \|W_i\|`, is a statement about the gradient
  relative to the weights; after momentum or learning-rate scaling the ratio
  means something else (and the threshold would have to move with the
  schedule).  It needs ``params`` in ``update``.

  **Cost.**  Per parameter: one read of ``G`` and ``W`` for the norms, one
  fused ``G * scale`` pass.  Small whole-tensor leaves (gains, biases,
  ``skip_gain``) share their norm kernels (grouped in zero-padded stacks), so
  an NFNet-F0 update compiles to ~280 kernels instead of ~680 for
  ``optax.adaptive_grad_clip`` (0.85x its time on an H100).

  **Layout.**  By default (:func:`default_unit_axes`) leaves with ``ndim >=
  2`` are reduced over all axes but the last (Haiku ``[I, O]`` linears,
  ``HWIO`` convs) and leaves with ``ndim <= 1`` form one unit.  Override with
  ``unit_axes``: an int / tuple of axes for every leaf, a mapping ``{path
  regex: axes}`` (first ``re.search`` match wins, unmatched leaves use the
  default), or a callable ``(path, leaf) -> axes``; axes ``None`` = the
  whole tensor.  Paths are ``'/'``-joined keys, e.g. ``'NFNet/~/linear/w'``.
  A leaf whose shape does not fit the stated axes raises ``ValueError``
  naming its path and shape.  (With ``optax.inject_hyperparams`` a callable
  ``unit_axes`` must be listed in ``static_args``, or optax treats it as a
  schedule; an int becomes an array there: pass a tuple, which stays
  static.)

  **Statistics.**  With ``stats=True`` the state is an :class:`AGCState`
  holding, per leaf, the units, units clipped and sum of clip factors of the
  last update, computed from the per-unit factors the clipping needs anyway
  (no extra pass over the gradients). It survives ``optax.chain``,
  ``masked``, ``MultiSteps`` and ``inject_hyperparams``; read it with
  :func:`agc_statistics` (overall and per group).

  Example (also a doctest)::

    >>> import jax.numpy as jnp, optax
    >>> from nfnets.optim import adaptive_grad_clip
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros((2,))}
    >>> grads = {'w': jnp.full((3, 2), 10.0), 'b': jnp.ones((2,))}
    >>> tx = optax.chain(
    ...     adaptive_grad_clip(0.01),           # 1. clip raw (pmean'd) grads
    ...     optax.add_decayed_weights(2e-5),    # 2. weight decay
    ...     optax.sgd(0.1, momentum=0.9, nesterov=True))  # 3. optimizer
    >>> state = tx.init(params)
    >>> clipped, _ = adaptive_grad_clip(0.01).update(grads, None, params)
    >>> # ||W_i|| = sqrt(3) per column, so every column of G is rescaled to
    >>> # norm 0.01 * sqrt(3); the bias (||W|| = 0 -> eps = 1e-3) to 1e-5.
    >>> round(float(jnp.linalg.norm(clipped['w'][:, 0])), 6)
    0.017321
    >>> round(float(jnp.linalg.norm(clipped['b'])), 8)
    1e-05
    >>> updates, state = tx.update(grads, state, params)

  Args:
    clipping: the threshold :math:`\lambda` (> 0).  May be a jax scalar, so
      ``optax.inject_hyperparams(adaptive_grad_clip)(clipping=schedule)``
      works.
    eps: lower bound on parameter norms, so that zero-initialised parameters
      (biases, ``skip_gain``) can still move.
    unit_axes: layout override, see above.
    stats: keep the clipping statistics in the state (default); False: an
      empty state.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if isinstance(clipping, numbers.Real) and not clipping >= 0:
    raise ValueError(f'adaptive_grad_clip: clipping must be >= 0, got '
                     f'{clipping!r}.')
  if isinstance(eps, numbers.Real) and not eps >= 0:
    raise ValueError(f'adaptive_grad_clip: eps must be >= 0, got {eps!r}.')
  resolve = _make_resolver(unit_axes)

  def init_fn(params):
    if not stats:
      return optax.EmptyState()
    zeros = lambda: jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
    return AGCState(units=zeros(), clipped=zeros(), factor_sum=zeros())

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_NO_PARAMS_MSG)
    u_leaves, u_def = jax.tree_util.tree_flatten_with_path(updates)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    if u_def != p_def:
      raise ValueError(
          'adaptive_grad_clip: updates and params have different tree '
          f'structures:\n  updates: {u_def}\n  params:  {p_def}')
    axes_list = []
    for (path, g), p in zip(u_leaves, p_leaves):
      name = path_to_str(path)
      if jnp.shape(g) != jnp.shape(p):
        raise ValueError(
            f'adaptive_grad_clip: leaf {name!r} has gradient shape '
            f'{jnp.shape(g)} but parameter shape {jnp.shape(p)}.')
      axes_list.append(
          _normalise_axes(resolve(name, p), name, tuple(jnp.shape(p))))
    out = _clip_leaves([jnp.asarray(g) for _, g in u_leaves],
                       [jnp.asarray(p) for p in p_leaves], axes_list,
                       clipping, eps)
    tree = lambda k: jax.tree_util.tree_unflatten(u_def, [o[k] for o in out])
    if stats:
      state = AGCState(units=tree(1), clipped=tree(2), factor_sum=tree(3))
    return tree(0), state

  return optax.GradientTransformation(init_fn, update_fn)


def agc_states(opt_state: PyTree) -> List[AGCState]:
  """Every :class:`AGCState` inside an optax state (chain, masked,
  MultiSteps, inject_hyperparams, partition, ...), in tree order."""
  leaves = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, AGCState))
  return [x for x in leaves if isinstance(x, AGCState)]


def agc_statistics(opt_state: PyTree, params: Optional[PyTree] = None,
                   depths: Optional[Sequence[int]] = None,
                   prefix: str = 'agc/') -> Dict[str, jax.Array]:
  """Clipping statistics of the last update, overall and per group.

  ``{prefix}clipped_frac``: fraction of units clipped; ``{prefix}clip_factor``:
  mean clip factor over all units (1 for a unit not clipped, so 1 - it is
  the mean shrinkage); the same per group of
  :func:`nfnets.optim.masks.param_groups` ('stem', 'stage1' ... 'stage4',
  'head') as ``{prefix}clipped_frac/stem`` ...: only the groups that have
  clipped parameters. A pure function of the per-leaf counts (no pass over
  gradients or params).

  Args:
    opt_state: an optax state holding one or more :class:`AGCState` (their
      counts add up), or an ``AGCState`` itself.
    params: the param tree, whose paths define the groups (stages by
      ``conv_shortcut`` blocks); None: the paths of the statistics.
    depths: blocks per stage, to place blocks without the shortcut rule.
    prefix: prefix of the returned keys.
  Raises:
    ValueError: no AGCState in ``opt_state`` (AGC off, or ``stats=False``).
  """
  states = agc_states(opt_state)
  if not states:
    raise ValueError('agc_statistics: the optimizer state holds no AGCState: '
                     'AGC is off, or adaptive_grad_clip(..., stats=False).')
  if params is None:  # the union of the statistics' paths
    params = {path_to_str(p): 0 for st in states
              for p, _ in jax.tree_util.tree_leaves_with_path(st.units)}
  labels = {path_to_str(path): label for path, label in
            jax.tree_util.tree_leaves_with_path(param_groups(params, depths))}
  sums = {}
  for st in states:
    fields = [jax.tree_util.tree_leaves_with_path(t)
              for t in (st.units, st.clipped, st.factor_sum)]
    for (path, units), (_, clipped), (_, fsum) in zip(*fields):
      name = path_to_str(path)
      label = labels.get(name, 'other')
      for key in ('', label):
        sums.setdefault(key, []).append((units, clipped, fsum))
  out = {}
  for key in [''] + [g for g in AGC_GROUPS if g in sums]:
    units, clipped, fsum = (jnp.sum(jnp.stack(v)) for v in zip(*sums[key]))
    units = jnp.maximum(units, 1.0)
    suffix = f'/{key}' if key else ''
    out[f'{prefix}clipped_frac{suffix}'] = clipped / units
    out[f'{prefix}clip_factor{suffix}'] = fsum / units
  return out
