"""Parameter-group helpers: label / mask functions over any param tree, by path.

Every leaf of a param tree is named by a *path string*: the keys on the way
to it joined by ``'/'``.  For a Haiku tree ``{'NFNet/~/linear': {'w': ...}}``
the path of the classifier kernel is ``'NFNet/~/linear/w'``; for nested dicts,
lists, tuples or dataclasses the keys / indices / attribute names are joined
the same way (``{'a': [x, y]}`` -> ``'a/0'``, ``'a/1'``).

The NFNet recipe has three parameter groups (as in DeepMind's release,
``experiment_nfnets.py``):

* the final classifier's *weight* (``'<root>/~/linear/w'``): no AGC (the
  paper, arXiv 2102.06171 Sec. 4.1, does not clip the final linear layer; the
  release partitions out the classifier's weights only, so its bias is
  clipped with the other gains / biases);
* gains, biases, ``skip_gain`` and other 1-D / scalar leaves: no weight decay;
* everything else: AGC and weight decay.

There is ONE definition of "the classifier": :data:`CLASSIFIER_MODULE_REGEX`
(the Haiku module path, e.g. ``'NFNet/~/linear'``) and :data:`CLASSIFIER_REGEX`
(every parameter of that module, e.g. ``'NFNet/~/linear/w'`` and ``'/b'``),
used for fine-tuning (re-initialising / training only the classifier); the
AGC exclusion is derived from it (:func:`is_agc_excluded`: the classifier's
leaves that are not gains / biases by name).

:func:`agc_mask`, :func:`weight_decay_mask` and :func:`param_labels` compute
these groups for :func:`optax.masked` / :func:`optax.partition` (they accept
the params tree and so can be passed directly as the ``mask`` callable).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax

PyTree = Any

# The top-level (root) module named exactly 'linear', as a Haiku module path:
# 'NFNet/~/linear', 'NF_ResNet/~/linear', 'NF_RegNet/~/linear' (and
# 'NFNet/linear', Haiku's name when the layer is created inside __call__
# rather than __init__); 'NFNet/~/nf_block/~/squeeze_excite/~/linear' and
# 'NFNet/~/linear_1' do not match.
CLASSIFIER_MODULE_REGEX = r'^[^/]+/(?:~/)?linear$'

# Every parameter of that module, as a '/'-joined param path
# ('NFNet/~/linear/w', 'NFNet/~/linear/b').
CLASSIFIER_REGEX = CLASSIFIER_MODULE_REGEX[:-1] + r'/[^/]+$'

# Param names that never get weight decay (same list as DeepMind's release:
# name in ['scale', 'offset', 'b'] or 'gain' in name or 'bias' in name).
NO_DECAY_NAMES = ('gain', 'bias', 'b', 'skip_gain', 'scale', 'offset')


def _key_to_str(key: Any) -> str:
  tu = jax.tree_util
  if isinstance(key, tu.DictKey):
    return str(key.key)
  if isinstance(key, tu.SequenceKey):
    return str(key.idx)
  if isinstance(key, tu.GetAttrKey):
    return str(key.name)
  if isinstance(key, tu.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_to_str(path: Sequence[Any]) -> str:
  """Joins a jax key path (from ``tree_flatten_with_path``) with ``'/'``."""
  return '/'.join(_key_to_str(k) for k in path)


def tree_paths(tree: PyTree) -> PyTree:
  """A tree of the same structure whose leaves are their path strings."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: path_to_str(p), tree)


def _compile(patterns: Union[None, str, Iterable[str]]) -> list[re.Pattern]:
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = (patterns,)
  return [re.compile(p) for p in patterns]


def _matches(path: str, regexes: Sequence[re.Pattern]) -> bool:
  return any(r.search(path) for r in regexes)


def _sample_paths(tree: PyTree, n: int = 5) -> list[str]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [path_to_str(p) for p, _ in leaves[:n]]


def is_classifier(path: str,
                  classifier_regex: Optional[str] = CLASSIFIER_REGEX) -> bool:
  """Whether the param path ``path`` belongs to the final classifier."""
  if classifier_regex is None:
    return False
  return re.search(classifier_regex, path) is not None


def is_classifier_module(module_path: str) -> bool:
  """Whether a Haiku module path (``'NFNet/~/linear'``) is the classifier."""
  return re.search(CLASSIFIER_MODULE_REGEX, module_path) is not None


def _is_gain_or_bias(name: str) -> bool:
  """The release's gains/biases predicate on a param name."""
  return name in ('scale', 'offset', 'b') or 'gain' in name or 'bias' in name


def is_agc_excluded(path: str,
                    classifier_regex: Optional[str] = CLASSIFIER_REGEX) -> bool:
  """Whether AGC skips the leaf at ``path``: the classifier's weights.

  The classifier's gains / biases (Haiku's ``b``) are clipped, as in the
  release, which puts them in the gains/biases group before separating the
  final linear layer's weights.
  """
  return (is_classifier(path, classifier_regex)
          and not _is_gain_or_bias(_leaf_name(path)))


def agc_mask(params: PyTree,
             *,
             classifier_regex: Optional[str] = CLASSIFIER_REGEX,
             exclude: Union[None, str, Iterable[str]] = None,
             missing_ok: bool = False) -> PyTree:
  """Boolean tree: True where adaptive gradient clipping applies.

  False for the final classifier's weights (the leaves of
  ``classifier_regex``, searched in each leaf's path string, that are not
  gains / biases: :func:`is_agc_excluded`) and for any leaf whose path
  matches one of the ``exclude`` regexes.  Use with ``optax.masked(adaptive_grad_clip(...),
  agc_mask)``.

  Args:
    params: any param tree (Haiku dict-of-dicts, nested containers, ...).
    classifier_regex: regex for the classifier's leaves; the default matches
      the root-level module named exactly ``linear`` (``'NFNet/~/linear/w'``
      and ``'.../b'``) but not ``squeeze_excite/~/linear``.  Only its
      weights are excluded (``w``; ``b`` is clipped, as in DeepMind's
      release).  ``None``: no classifier exclusion.
    exclude: extra regexes of paths to exclude from AGC.
    missing_ok: if False (default) and ``classifier_regex`` matches no leaf,
      raise: a classifier silently clipped is exactly the mistake the paper
      warns about.  Set True for trees that have no classifier.

  Returns:
    A tree of Python bools with the structure of ``params``.
  """
  extra = _compile(exclude)
  paths = tree_paths(params)
  mask = jax.tree_util.tree_map(
      lambda p: not (is_agc_excluded(p, classifier_regex)
                     or _matches(p, extra)),
      paths)
  if classifier_regex is not None and not missing_ok:
    if not any(is_agc_excluded(p, classifier_regex)
               for p in jax.tree_util.tree_leaves(paths)):
      raise ValueError(
          f'agc_mask: classifier_regex {classifier_regex!r} matches no leaf '
          '(no classifier weight) of the param tree (first paths: '
          f'{_sample_paths(params)}). Pass the regex of your final '
          'classifier, classifier_regex=None to clip everything, or '
          'missing_ok=True.')
  return mask


def _leaf_name(path: str) -> str:
  return path.rsplit('/', 1)[-1]


def weight_decay_mask(params: PyTree,
                      *,
                      no_decay_names: Iterable[str] = NO_DECAY_NAMES,
                      exclude_low_rank: bool = True,
                      exclude: Union[None, str, Iterable[str]] = None) -> PyTree:
  """Boolean tree: True where weight decay applies (weights only).

  False for leaves whose last path component is in ``no_decay_names``
  (gains, biases, ``skip_gain``, Haiku's ``b``, LayerNorm ``scale`` /
  ``offset``), whose name contains ``'gain'`` or ``'bias'`` (as in the
  release), whose ``ndim <= 1`` (when ``exclude_low_rank``), or whose path
  matches one of the ``exclude`` regexes.
  """
  names = set(no_decay_names)
  extra = _compile(exclude)

  def decide(path, leaf):
    p = path_to_str(path)
    name = _leaf_name(p)
    if name in names or 'gain' in name or 'bias' in name:
      return False
    if exclude_low_rank and getattr(leaf, 'ndim', 0) <= 1:
      return False
    return not _matches(p, extra)

  return jax.tree_util.tree_map_with_path(decide, params)


def param_labels(params: PyTree,
                 *,
                 classifier_regex: Optional[str] = CLASSIFIER_REGEX,
                 no_decay_names: Iterable[str] = NO_DECAY_NAMES) -> PyTree:
  """String labels for ``optax.partition``: 'classifier', 'no_decay', 'weights'.

  'classifier' wins over 'no_decay' (so the classifier bias is labelled
  'classifier').  Suitable as ``param_labels`` of ``optax.partition``.
  """
  wd = weight_decay_mask(params, no_decay_names=no_decay_names)
  paths = tree_paths(params)

  def label(p, decay):
    if is_classifier(p, classifier_regex):
      return 'classifier'
    return 'weights' if decay else 'no_decay'

  return jax.tree_util.tree_map(label, paths, wd)


def mask_fn(fn: Callable[..., PyTree], **kwargs) -> Callable[[PyTree], PyTree]:
  """``functools.partial``-like helper: ``mask_fn(agc_mask, exclude='x')``."""
  return lambda params: fn(params, **kwargs)


# ----------------------------------------------------------------------------
# Architectural groups (for per-group statistics such as AGC's).

# The groups of every family: the stem (NFNet 'stem_conv*', NF-ResNet /
# NF-RegNet 'initial_conv'), the four stages of residual blocks, and the head
# (final_conv, the classifier). Other root-level modules count as 'head'.
AGC_GROUPS = ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
_STEM_RE = re.compile(r'^[^/]+/(?:~/)?(?:stem\w*|initial_conv)(?:/|$)')
# 'NFNet/~/nf_block_3/...', 'NF_ResNet/~/nf_res_block/...' -> block index.
_BLOCK_RE = re.compile(r'^[^/]+/(?:~/)?nf_(?:\w+_)?block(?:_(\d+))?(?:/|$)')
_ROOT_MODULE_RE = re.compile(r'^[^/]+/(?:~/)?[^/]+/[^/]+$')


def _block_index(path: str) -> Optional[int]:
  m = _BLOCK_RE.match(path)
  if m is None:
    return None
  return int(m.group(1) or 0)


def _stage_starts(paths: Sequence[str],
                  depths: Optional[Sequence[int]]) -> list[int]:
  """First block index of each stage: from ``depths``, else the blocks that
  hold a ``conv_shortcut`` (every family's stage transitions)."""
  if depths is not None:
    starts, total = [], 0
    for d in depths:
      starts.append(total)
      total += int(d)
    return starts
  starts = sorted({_block_index(p) for p in paths
                   if _block_index(p) is not None and '/conv_shortcut/' in p})
  return starts if starts and starts[0] == 0 else [0] + starts


def group_of(path: str, stage_starts: Sequence[int]) -> str:
  """The group ('stem', 'stage1' ... 'stage4', 'head' or 'other') of a
  param path, given the first block index of each stage."""
  if _STEM_RE.match(path):
    return 'stem'
  index = _block_index(path)
  if index is not None:
    return f'stage{sum(1 for s in stage_starts if s <= index)}'
  return 'head' if _ROOT_MODULE_RE.match(path) else 'other'


def param_groups(params: PyTree,
                 depths: Optional[Sequence[int]] = None) -> PyTree:
  """String labels by architectural group, a tree of ``params``' structure.

  Labels are :data:`AGC_GROUPS` ('stem', 'stage1' ... 'stage4', 'head') for
  NFNet / NF-ResNet / NF-RegNet trees, 'other' for leaves outside a Haiku
  root module. Stages come from ``depths`` (blocks per stage) when given,
  else from the blocks with a ``conv_shortcut`` (the first block of every
  stage has one in all three families, for every variant).

  Args:
    params: any param tree (or a tree of the same paths, e.g. statistics).
    depths: blocks per stage, e.g. ``(1, 2, 6, 3)`` for F0.
  """
  paths = tree_paths(params)
  starts = _stage_starts(jax.tree_util.tree_leaves(paths), depths)
  return jax.tree_util.tree_map(lambda p: group_of(p, starts), paths)
