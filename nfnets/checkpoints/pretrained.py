"""Loading NFNet weights for use: `load_pretrained` (read any format, infer
the variant, check every parameter against the model), the description of a
tree (`summarize`, `infer_variant`), and the fine-tuning helpers
(`merge_into`, `init_from_checkpoint`, `trainable_mask`).

Every loaded tree is checked against the model's parameter shapes
(`nfnets.models.param_shapes`): module paths, names, shapes and dtypes, with
missing / unexpected / mis-shaped parameters listed by 'module:param'. The
file formats themselves are `nfnets.checkpoints.formats`.
"""
import dataclasses
import os
import re
from typing import Any, Dict, Mapping, Optional, Pattern, Tuple, Union

import numpy as np

from nfnets.checkpoints import timm as timm_weights
from nfnets.checkpoints.errors import (CheckpointError, ParamMismatchError,
                                       VariantMismatchError)
from nfnets.checkpoints.formats import SEP, Params, read_params
from nfnets.optim import masks

_MAX_LISTED = 15  # parameters listed per kind in a mismatch message


class ModuleMatcher:
  """The module-path view of a param-path regex: module `m` matches iff the
  regex matches a parameter of it ('m/w'). Usable wherever a compiled regex
  over module paths is (`.search`, `.match`, `.pattern`)."""

  def __init__(self, param_regex: str):
    self.pattern = param_regex
    self._regex = re.compile(param_regex)

  def search(self, module: str):
    return self._regex.search(f'{module}/w')

  match = search

  def __repr__(self) -> str:
    return f'ModuleMatcher({self.pattern!r})'


# The classifier of every family (the root module's 'linear', e.g.
# 'NFNet/~/linear'), not the squeeze-excite linears inside blocks: derived
# from the one definition, nfnets.optim.masks.CLASSIFIER_REGEX.
CLASSIFIER = ModuleMatcher(masks.CLASSIFIER_REGEX)


# ----------------------------------------------------------------------------
# Describing a tree and inferring the variant.


@dataclasses.dataclass(frozen=True)
class TreeSummary:
  """What a params tree looks like (for inference and error messages)."""
  top: str
  depths: Tuple[int, ...]
  widths: Tuple[int, ...]
  num_classes: Optional[int]
  num_params: int

  def describe(self) -> str:
    parts = [f'top module {self.top!r}']
    if self.depths:
      parts.append(f'blocks per stage {self.depths}')
      parts.append(f'stage widths {self.widths}')
    if self.num_classes is not None:
      parts.append(f'{self.num_classes} classes')
    parts.append(f'{self.num_params / 1e6:.1f}M params')
    return ', '.join(parts)


_BLOCK_RE = re.compile(r'^(?:NFNet|NFNet_L)/~/nf_block(?:_(\d+))?/~/conv2$')


def _shape(x) -> Tuple[int, ...]:
  """Shape of an array, jax.ShapeDtypeStruct or scalar."""
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def summarize(params: Mapping[str, Mapping[str, Any]]) -> TreeSummary:
  """Blocks per stage, stage widths and classes of an NFNet-style tree."""
  tops = sorted({m.split('/')[0] for m in params})
  top = tops[0] if len(tops) == 1 else '|'.join(tops)
  num_params = int(sum(np.prod(_shape(v)) for d in params.values()
                       for v in d.values()))
  num_classes = None
  for module, sub in params.items():
    if CLASSIFIER.search(module) and len(_shape(sub.get('w', 0))) == 2:
      num_classes = int(_shape(sub['w'])[1])
  blocks = sorted(int(m.group(1) or 0) for m in map(_BLOCK_RE.match, params)
                  if m)
  depths, widths = [], []
  for i in blocks:
    prefix = f'{top}/~/nf_block' + (f'_{i}' if i else '')
    width = _shape(params.get(f'{prefix}/~/conv2', {}).get('w', ()))
    width = int(width[-1]) if width else 0
    if f'{prefix}/~/conv_shortcut' in params or not depths:
      depths.append(0)
      widths.append(width)
    depths[-1] += 1
  return TreeSummary(top, tuple(depths), tuple(widths), num_classes,
                     num_params)


def infer_variant(params: Mapping[str, Mapping[str, Any]]) -> Optional[str]:
  """'F0'..'F7' / 'F0+'.. from blocks per stage and widths, else None.

  NF-ResNet / NF-RegNet trees are matched by trying that family's variants.
  """
  import nfnets.models as M  # pylint: disable=g-import-not-at-top
  summary = summarize(params)
  if summary.top in ('NFNet', 'NFNet_L'):
    family = 'nfnet' if summary.top == 'NFNet' else 'nfnet_l'
    eca = any(m.endswith('/~/eca') for m in params)
    final = _shape(params.get(f'{summary.top}/~/final_conv', {}).get('w', ()))
    for name in M.variants():
      spec = M.get_variant(name)
      if (spec.family != family or tuple(spec.depth) != summary.depths
          or tuple(spec.width) != summary.widths):
        continue
      if family == 'nfnet' or (
          (spec.attention == 'eca') == eca and final
          and int(spec.width[-1] * spec.final_conv_mult) == final[-1]):
        return name
    return None
  family = {'NF_ResNet': 'nf_resnet', 'NF_RegNet': 'nf_regnet',
            'NF_ResNet_T': 'nf_resnet_timm'}.get(summary.top)
  if family is None or summary.num_classes is None:
    return None
  for name in M.variants():
    if (M.get_variant(name).family == family and not any(
        _compare(params, M.param_shapes(name, summary.num_classes)))):
      return name
  return None


# ----------------------------------------------------------------------------
# Validation.


def _natural(text: str):
  """Sort key: 'nf_block_2' before 'nf_block_12'."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', text)]


def _compare(params, expected):
  """Returns (missing, unexpected, mismatched) lists of strings."""
  missing, unexpected, mismatched = [], [], []
  for module in sorted(set(expected) | set(params), key=_natural):
    exp, got = expected.get(module, {}), params.get(module, {})
    for name in sorted(set(exp) | set(got)):
      key = f'{module}{SEP}{name}'
      if name not in got:
        e = exp[name]
        missing.append(f'{key} (expected {tuple(e.shape)} {np.dtype(e.dtype)})')
      elif name not in exp:
        unexpected.append(f'{key} ({_shape(got[name])})')
      else:
        e, g = exp[name], got[name]
        gshape, gdtype = _shape(g), np.dtype(g.dtype)
        if gshape != tuple(e.shape):
          mismatched.append(f'{key}: file has shape {gshape}, model expects '
                            f'{tuple(e.shape)}')
        elif gdtype != np.dtype(e.dtype):
          mismatched.append(f'{key}: file has dtype {gdtype}, model expects '
                            f'{np.dtype(e.dtype)}')
  return missing, unexpected, mismatched


def _listing(title, items):
  if not items:
    return ''
  lines = [f'\n  {title} ({len(items)}):']
  lines += [f'    {x}' for x in items[:_MAX_LISTED]]
  if len(items) > _MAX_LISTED:
    lines.append(f'    ... and {len(items) - _MAX_LISTED} more')
  return '\n'.join(lines)


def _as_dict(kwargs) -> Dict[str, Any]:
  """Constructor overrides as a dict (accepts a ConfigDict too)."""
  if kwargs is None:
    return {}
  if hasattr(kwargs, 'to_dict'):
    kwargs = kwargs.to_dict()
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in dict(kwargs).items()}


def validate_params(params: Mapping[str, Mapping[str, Any]], variant: str,
                    num_classes: Optional[int] = None,
                    model_kwargs: Optional[Mapping[str, Any]] = None,
                    source: str = 'checkpoint') -> None:
  """Checks every module path, name, shape and dtype against the model.

  Args:
    params: the tree to check.
    variant: model name (see nfnets.models.variants()).
    num_classes: classifier size; None -> taken from the tree.
    model_kwargs: constructor overrides (width, depth, ...), if any.
    source: how to name the tree in messages (e.g. the path).
  Raises:
    VariantMismatchError: the tree is another known variant.
    ParamMismatchError: anything else that differs; lists it by path.
  """
  import nfnets.models as M  # pylint: disable=g-import-not-at-top
  model_kwargs = _as_dict(model_kwargs)
  canonical = M.get_variant(variant).name
  summary = summarize(params)
  if num_classes is None:
    num_classes = summary.num_classes or 1000
  expected = M.param_shapes(canonical, num_classes, **model_kwargs)
  missing, unexpected, mismatched = _compare(params, expected)
  if not (missing or unexpected or mismatched):
    return
  details = (_listing('missing', missing) + _listing('unexpected', unexpected)
             + _listing('mis-shaped / wrong dtype', mismatched))
  kw = dict(missing=missing, unexpected=unexpected, mismatched=mismatched)
  model = canonical + (f' with {model_kwargs}' if model_kwargs else '')
  detected = infer_variant(params)
  if detected is not None and detected != canonical:
    raise VariantMismatchError(
        f'{source} does not match variant {model}: it looks like {detected} '
        f'({summary.describe()}). Pass variant={detected!r} (or leave it '
        f'out to infer it).{details}', requested=canonical,
        detected=detected, **kw)
  problems = [p.split(SEP)[0] for p in missing + unexpected + mismatched]
  if (summary.num_classes is not None and num_classes != summary.num_classes
      and all(CLASSIFIER.search(p) for p in problems)):
    raise ParamMismatchError(
        f'{source}: the classifier has {summary.num_classes} classes but '
        f'{num_classes} were requested. To fine-tune on a new label set, load '
        'with num_classes=None and use merge_into(init_params, loaded, '
        f'reset=CLASSIFIER) or init_from_checkpoint().{details}', **kw)
  raise ParamMismatchError(
      f'{source} does not match the parameters of {model} '
      f'({num_classes} classes); the file has {summary.describe()}.'
      f'{details}', **kw)


def load_pretrained(path: str, variant: Optional[str] = None,
                    num_classes: Optional[int] = None, *, which: str = 'ema',
                    model_kwargs: Optional[Mapping[str, Any]] = None,
                    validate: bool = True, check_release: bool = True
                    ) -> Params:
  """Loads released or own NFNet weights safely and checks them.

  Args:
    path: DeepMind's released file (a dill pickle, e.g. F0_haiku.npz), a
      plain .npz written by `save_npz` / convert_checkpoint.py (flat or torch
      layout), an orbax checkpoint directory of ours, or timm's
      model.safetensors (dm_nfnet_f*, eca_nfnet_l*, nfnet_l0, nf_resnet50).
    variant: e.g. 'F0'. None -> inferred from the tree (blocks per stage and
      widths); an error if it matches no known variant.
    num_classes: classifier size to expect; None -> whatever the file has.
    which: 'ema' or 'raw' for checkpoints holding both (our orbax ones).
    model_kwargs: constructor overrides of the model the file was trained
      with (e.g. width=0.5), if not the variant's defaults.
    validate: check paths, names, shapes and dtypes (default True).
    check_release: compare a file's MD5 with the released files (below).
  Returns:
    {module_path: {param_name: np.ndarray}}, the Haiku params tree.
  Raises:
    UnsafeCheckpointError: a pickle names a global that is not allowed.
    TruncatedCheckpointError: truncated / corrupt / not a checkpoint.
    VariantMismatchError, ParamMismatchError: see `validate_params`.

  A file's MD5 is compared with DeepMind's released files
  (`release_files.check_file`): a match is logged (INFO); a file named
  F<k>_haiku.npz with another digest gets one `ReleaseChecksumWarning`.
  """
  path = os.fspath(path)
  if check_release and os.path.isfile(path):
    from nfnets.checkpoints import release_files  # pylint: disable=g-import-not-at-top
    release_files.check_file(path)  # MD5 vs the release; warns on mismatch
  if timm_weights.is_safetensors(path):
    params, detected = timm_weights.read_timm(path, variant)
    variant = variant or detected
  else:
    params = read_params(path, which)
  if variant is None:
    variant = infer_variant(params)
    if variant is None:
      raise CheckpointError(
          f'Cannot infer the variant of {path} ({summarize(params).describe()}'
          '); pass variant= (and model_kwargs= for non-default models).')
  if validate:
    validate_params(params, variant, num_classes, model_kwargs, source=path)
  return params


# ----------------------------------------------------------------------------
# Fine-tuning helpers.


def _compile(reset):
  """None, or something with .search(module) (a regex or ModuleMatcher)."""
  if reset is None or reset is False:
    return None
  return reset if hasattr(reset, 'search') else re.compile(reset)


def merge_into(init_params: Mapping[str, Mapping[str, Any]],
               loaded: Mapping[str, Mapping[str, Any]],
               reset: Union[str, Pattern[str], ModuleMatcher,
                            None] = CLASSIFIER
               ) -> Dict[str, Dict[str, Any]]:
  """Takes `loaded` for every module except those matching `reset`.

  Modules whose path matches `reset` (default: the classifier) keep their
  values from `init_params` -- e.g. a freshly initialised classifier for a
  new number of classes (N(0, 0.01) weights, zero bias: zero-mean, as in the
  paper). Everything else must be present in `loaded` with the same shape
  and dtype.

  Args:
    init_params: the model's freshly initialised params (numpy or jax).
    loaded: params from `load_pretrained`.
    reset: regex (re.search on module paths) of modules to keep from init;
      None to take everything from `loaded`.
  Returns:
    A new tree with init_params' structure.
  Raises:
    ParamMismatchError: listing missing / unexpected / mis-shaped params.
  """
  pattern = _compile(reset)
  keep = lambda module: pattern is not None and pattern.search(module)
  if pattern is not None and not any(keep(m) for m in init_params):
    raise ParamMismatchError(
        f'reset={pattern.pattern!r} matches no module of the model; modules '
        f'are e.g. {sorted(init_params)[:3]}.')
  out: Dict[str, Dict[str, Any]] = {}
  missing, unexpected, mismatched = [], [], []
  for module, sub in init_params.items():
    if keep(module):
      out[module] = dict(sub)
      continue
    src = loaded.get(module, {})
    out[module] = {}
    for name, init in sub.items():
      key = f'{module}{SEP}{name}'
      if name not in src:
        missing.append(f'{key} (expected {tuple(np.shape(init))})')
        continue
      value = src[name]
      if tuple(np.shape(value)) != tuple(np.shape(init)):
        hint = (' (the classifier: use reset=CLASSIFIER / '
                'reset_classifier=True for a new number of classes)'
                if CLASSIFIER.search(module) else '')
        mismatched.append(f'{key}: checkpoint has shape '
                          f'{tuple(np.shape(value))}, model expects '
                          f'{tuple(np.shape(init))}{hint}')
      elif np.dtype(value.dtype) != np.dtype(init.dtype):
        mismatched.append(f'{key}: checkpoint has dtype {value.dtype}, model '
                          f'expects {init.dtype}')
      else:
        out[module][name] = value
    for name in set(src) - set(sub):
      unexpected.append(f'{module}{SEP}{name}')
  for module in set(loaded) - set(init_params):
    if not keep(module):
      unexpected.extend(f'{module}{SEP}{n}' for n in loaded[module])
  if missing or unexpected or mismatched:
    raise ParamMismatchError(
        'cannot merge the checkpoint into the model:'
        + _listing('missing from checkpoint', sorted(missing, key=_natural))
        + _listing('not in the model', sorted(unexpected, key=_natural))
        + _listing('mis-shaped / wrong dtype',
                   sorted(mismatched, key=_natural)),
        missing=missing, unexpected=unexpected, mismatched=mismatched)
  return out


def init_from_checkpoint(init_params: Mapping[str, Mapping[str, Any]],
                         path: str, *, variant: Optional[str] = None,
                         which: str = 'ema', reset_classifier: bool = True,
                         model_kwargs: Optional[Mapping[str, Any]] = None
                         ) -> Dict[str, Dict[str, Any]]:
  """load_pretrained (classes from the file) + merge_into for fine-tuning.

  With reset_classifier=True the model's own initial classifier is kept
  (any number of classes); otherwise the checkpoint's classifier is used and
  must have the model's number of classes.
  """
  loaded = load_pretrained(path, variant, None, which=which,
                           model_kwargs=model_kwargs)
  return merge_into(init_params, loaded,
                    reset=CLASSIFIER if reset_classifier else None)


def trainable_mask(params: Mapping[str, Mapping[str, Any]],
                   trainable: Union[str, Pattern[str],
                                    ModuleMatcher] = CLASSIFIER
                   ) -> Dict[str, Dict[str, bool]]:
  """{module: {param: bool}}: True where the module path matches `trainable`.

  For freezing the body while fine-tuning (e.g. with optax.masked or
  zeroing the updates of False leaves).
  """
  pattern = _compile(trainable)
  return {m: {n: bool(pattern and pattern.search(m)) for n in d}
          for m, d in params.items()}
