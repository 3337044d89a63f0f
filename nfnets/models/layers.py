"""Building blocks shared by every normalizer-free model family.

All modules create their parameters in float32, whatever the dtype of their
input, and compute in the dtype of their input. Feed bfloat16 images to get
bfloat16 compute with float32 master weights (the fix for the original
release, which created bfloat16 parameters when bf16 was on).
"""
import contextlib
import contextvars
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import cpu_conv

# Gamma constants: scale so that gamma * act(x) has unit second moment for
# x ~ N(0, 1) (Brock et al. 2021a, appendix; values from the public release).
ACTIVATION_GAMMAS = {
    'identity': 1.0,
    'celu': 1.270926833152771,
    'elu': 1.2716004848480225,
    'gelu': 1.7015043497085571,
    'glu': 1.8484294414520264,
    'leaky_relu': 1.70590341091156,
    'log_sigmoid': 1.9193484783172607,
    'relu': 1.7139588594436646,
    'relu6': 1.7131484746932983,
    'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291,
    'silu': 1.7881293296813965,
    'soft_sign': 2.338853120803833,
    'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204,
}
# 'swish' is the same function as 'silu' (the release's NF-RegNet default name,
# which its table lacked).
_ALIASES = {'swish': 'silu'}

_BASE_FNS = {
    'identity': lambda x: x,
    'celu': jax.nn.celu,
    'elu': jax.nn.elu,
    'gelu': jax.nn.gelu,  # tanh approximation (jax default), as in the release.
    'glu': jax.nn.glu,
    'leaky_relu': jax.nn.leaky_relu,
    'log_sigmoid': jax.nn.log_sigmoid,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'selu': jax.nn.selu,
    'sigmoid': jax.nn.sigmoid,
    'silu': jax.nn.silu,
    'soft_sign': jax.nn.soft_sign,
    'softplus': jax.nn.softplus,
    'tanh': jnp.tanh,
}


def activation_names() -> Sequence[str]:
  return sorted(list(_BASE_FNS) + list(_ALIASES))


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the gamma-scaled nonlinearity `gamma * act(x)` called `name`."""
  key = _ALIASES.get(name, name)
  if key not in _BASE_FNS:
    raise ValueError(f'Unknown activation {name!r}; choose one of '
                     f'{", ".join(activation_names())}.')
  fn, gamma = _BASE_FNS[key], ACTIVATION_GAMMAS[key]

  def scaled(x):
    return fn(x) * jnp.asarray(gamma, x.dtype)

  scaled.__name__ = f'scaled_{key}'
  return scaled


def _pair(v: Union[int, Sequence[int]]) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


# Values of `conv_lowering` (None: `default_conv_lowering`).
CONV_LOWERINGS = ('xla', 'cpu')


def check_conv_lowering(conv_lowering: Optional[str]) -> Optional[str]:
  """Returns `conv_lowering` if valid, else raises a ValueError."""
  if conv_lowering is not None and conv_lowering not in CONV_LOWERINGS:
    raise ValueError(
        f'conv_lowering must be None (backend default), "xla" (one XLA '
        f'convolution, grouped natively) or "cpu" (the XLA:CPU arrangement in '
        f'nfnets.models.cpu_conv), got {conv_lowering!r}.')
  return conv_lowering


def default_conv_lowering(groups: int = 1) -> str:
  """'cpu' on the CPU backend for convolutions with at most
  cpu_conv.MAX_SPLIT_GROUPS groups (XLA:CPU's grouped convolutions cost about
  groups times a dense one; docs/benchmarking.md), 'xla' elsewhere."""
  if jax.default_backend() == 'cpu' and groups <= cpu_conv.MAX_SPLIT_GROUPS:
    return 'cpu'
  return 'xla'


# fn(module, w, gain, standardize) -> kernel; see `kernel_hook`.
KernelHook = Callable[['WSConv2D', jax.Array, jax.Array,
                       Callable[[jax.Array, jax.Array], jax.Array]], jax.Array]
_KERNEL_HOOK: contextvars.ContextVar[Optional[KernelHook]] = (
    contextvars.ContextVar('nfnets_ws_kernel_hook', default=None))


@contextlib.contextmanager
def kernel_hook(fn: KernelHook) -> Iterator[None]:
  """Within this context every WSConv2D gets its kernel from `fn`.

  fn(module, w, gain, standardize) receives the module, its 'w' and 'gain'
  exactly as hk.get_parameter returned them, and `standardize(w, gain)`, the
  module's own standardisation (same lowering and eps); it returns the
  kernel the convolution uses. Default (no hook): standardize(w, gain).
  Uses: FSDP standardises each device's output-channel shard and gathers
  the result; export substitutes kernels standardised once, ahead of time.
  The hook must be active while the model is traced.
  """
  token = _KERNEL_HOOK.set(fn)
  try:
    yield
  finally:
    _KERNEL_HOOK.reset(token)


class WSConv2D(hk.Module):
  """2-D convolution with scaled weight standardisation (NHWC, HWIO kernel).

  w_hat = gain * (w - mean(w)) / sqrt(max(var(w) * fan_in, eps)), with mean
  and variance per output channel over (H, W, I) and fan_in = H * W * I.
  The standardisation runs in float32; the conv runs in the input's dtype.

  Args:
    output_channels: number of output channels.
    kernel_shape: kernel size (int or (kh, kw)).
    stride: stride (int or pair).
    padding: 'SAME' or 'VALID'.
    feature_group_count: number of groups (grouped convolution).
    eps: floor of var * fan_in (1e-4 in the release).
    gain_init: initial value of the per-output 'gain' (1).
    conv_lowering: how the convolution is lowered, same function and
      parameters either way: 'xla' (one XLA convolution, grouped natively,
      jnp.mean / jnp.var standardisation), 'cpu' (nfnets.models.cpu_conv: one
      dense conv per group, 1x1 convs and the standardisation sums as matrix
      products; faster on XLA:CPU) or None for `default_conv_lowering`.
    name: module name.
  """

  def __init__(self,
               output_channels: int,
               kernel_shape: Union[int, Sequence[int]] = 3,
               stride: Union[int, Sequence[int]] = 1,
               padding: str = 'SAME',
               feature_group_count: int = 1,
               eps: float = 1e-4,
               conv_lowering: Optional[str] = None,
               name: Optional[str] = None,
               gain_init: float = 1.0):
    super().__init__(name=name)
    self.gain_init = gain_init
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape)
    self.stride = _pair(stride)
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.eps = eps
    self.conv_lowering = check_conv_lowering(conv_lowering)

  @property
  def lowering(self) -> str:
    """The lowering used: 'xla' or 'cpu' (resolved at trace time)."""
    return self.conv_lowering or default_conv_lowering(
        self.feature_group_count)

  def standardized_weight(self, in_channels: int) -> jax.Array:
    groups = self.feature_group_count
    if in_channels % groups or self.output_channels % groups:
      raise ValueError(
          f'{self.module_name}: channels in={in_channels} out='
          f'{self.output_channels} are not divisible by {groups} groups.')
    shape = self.kernel_shape + (in_channels // groups, self.output_channels)
    w = hk.get_parameter(
        'w', shape, jnp.float32,
        init=hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal'))
    gain = hk.get_parameter(
        'gain', (self.output_channels,), jnp.float32,
        init=lambda shape, dtype: jnp.full(shape, self.gain_init, dtype))
    hook = _KERNEL_HOOK.get()
    if hook is None:
      return self.standardize(w, gain)
    return hook(self, w, gain, self.standardize)

  def standardize(self, w: jax.Array, gain: jax.Array) -> jax.Array:
    """The scaled standardisation of an HWIO kernel `w` with per-output
    `gain` (works on any slice of the output channels, with its gains)."""
    w = w.astype(jnp.float32)
    if self.lowering == 'cpu':
      return cpu_conv.standardize_by_matmul(w, gain, self.eps)
    fan_in = w.shape[0] * w.shape[1] * w.shape[2]
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps)) * gain
    return (w - mean) * scale

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.standardized_weight(x.shape[-1]).astype(x.dtype)
    bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32,
                            init=jnp.zeros)
    groups = self.feature_group_count
    if self.lowering == 'cpu':
      out = cpu_conv.conv(x, w, self.stride, self.padding, groups)
    else:
      out = jax.lax.conv_general_dilated(
          x, w, window_strides=self.stride, padding=self.padding,
          dimension_numbers=cpu_conv.DIMENSION_NUMBERS,
          feature_group_count=groups)
    return out + bias.astype(out.dtype)


class Linear(hk.Module):
  """Dense layer with float32 parameters 'w' [in, out] and 'b' [out].

  Args:
    output_size: number of outputs.
    w_init: initializer of 'w'. Default: hk.Linear's (and so the release's
      squeeze-excite layers'), a normal with stddev 1 / sqrt(fan_in)
      truncated at 2 stddevs, not rescaled (sample std ~0.88 / sqrt(fan_in)).
    name: module name.
  """

  def __init__(self, output_size: int,
               w_init: Optional[hk.initializers.Initializer] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.w_init = w_init

  def __call__(self, x: jax.Array) -> jax.Array:
    w_init = self.w_init or hk.initializers.TruncatedNormal(
        1.0 / x.shape[-1] ** 0.5)
    w = hk.get_parameter('w', (x.shape[-1], self.output_size), jnp.float32,
                         init=w_init)
    b = hk.get_parameter('b', (self.output_size,), jnp.float32,
                         init=jnp.zeros)
    return jnp.dot(x, w.astype(x.dtype)) + b.astype(x.dtype)


def classifier(num_classes: int) -> Linear:
  """The families' final 'linear' layer: w ~ N(0, 0.01), zero bias (the
  release's NFNet and NF_ResNet with fc_init=None). Create it in the model's
  __init__, so that its path is '<model>/~/linear'."""
  return Linear(num_classes, w_init=hk.initializers.RandomNormal(0.01, 0.0),
                name='linear')


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite: sigmoid(fc1(relu(fc0(mean_hw(x))))) of shape [B,1,1,C].

  The caller multiplies by 2 (so that the expected gain is 1 at init).

  Args:
    in_ch: input channels.
    out_ch: output channels.
    se_ratio: hidden width = max(1, int(in_ch * se_ratio)).
    name: module name ('squeeze_excite'); its layers are 'linear', 'linear_1'
      (Linear's default init, as hk.Linear in the release).
  """

  def __init__(self, in_ch: int, out_ch: int, se_ratio: float = 0.5,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.hidden_ch = max(1, int(in_ch * se_ratio))
    self.fc0 = Linear(self.hidden_ch, name='linear')
    self.fc1 = Linear(out_ch, name='linear_1')

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(jax.nn.relu(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None, :]


def stochastic_depth(x: jax.Array, drop_rate: float,
                     is_training: bool) -> jax.Array:
  """Drops whole residual branches per example ([B,1,1,1] Bernoulli mask).

  As in the release: the kept branches are *not* rescaled by 1/keep_prob,
  and stochastic depth is off (x returned unchanged) unless
  0 < drop_rate < 1. Needs an hk rng key when it is on and is_training.
  """
  if not is_training or not 0.0 < drop_rate < 1.0:
    return x
  keep_prob = 1.0 - drop_rate
  r = jax.random.uniform(hk.next_rng_key(), (x.shape[0], 1, 1, 1), jnp.float32)
  mask = jnp.floor(keep_prob + r).astype(x.dtype)
  return x * mask


def check_stochdepth_rate(rate: float) -> float:
  """A model's stochdepth_rate (the last block's drop rate) must be in
  [0, 1]; returns it."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f'stochdepth_rate must be in [0, 1] (0 = off), got '
                     f'{rate!r}.')
  return rate


def gated_residual(branch: jax.Array, shortcut: jax.Array, alpha: float,
                   stochdepth_rate: float, is_training: bool):
  """Ends a residual block: shortcut + alpha * skip_gain * dropped(branch).

  Creates the block's scalar 'skip_gain' (zero-initialised, so every block is
  the identity on its shortcut at init). Returns (output, the branch's
  channel-averaged variance before stochastic depth), the latter for SPPs.
  """
  res_avg_var = jnp.mean(jnp.var(branch.astype(jnp.float32), axis=(0, 1, 2)))
  branch = stochastic_depth(branch, stochdepth_rate, is_training)
  skip_gain = hk.get_parameter('skip_gain', (), jnp.float32, init=jnp.zeros)
  out = branch * (skip_gain * alpha).astype(branch.dtype) + shortcut
  return out, res_avg_var


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if not is_training or rate <= 0.0:
    return x
  return hk.dropout(hk.next_rng_key(), rate, x)


class FeatureInfo(NamedTuple):
  """A feature map a model returns with return_features=True."""
  channels: int  # last-axis size.
  stride: int    # input px per feature px; the map is ceil(H / stride) high.


def stage_strides(stem_stride: int, first_stage_stride: int) -> List[int]:
  """Output strides of the four stages: the first stage strides by
  `first_stage_stride`, the others by 2."""
  strides, s = [], stem_stride
  for stage_stride in (first_stage_stride, 2, 2, 2):
    s *= stage_stride
    strides.append(s)
  return strides


def make_feature_info(stem: Tuple[int, int], stage_channels: Sequence[int],
                      strides: Sequence[int],
                      final_channels: int) -> Dict[str, FeatureInfo]:
  """{'stem', 'stage1'..'stage4', 'final'} -> FeatureInfo; 'final' is the
  activated map that is globally pooled (stride of the last stage)."""
  info = {'stem': FeatureInfo(*stem)}
  for i, (ch, s) in enumerate(zip(stage_channels, strides)):
    info[f'stage{i + 1}'] = FeatureInfo(ch, s)
  info['final'] = FeatureInfo(final_channels, strides[-1])
  return info


class BlockSlot(NamedTuple):
  """Where a residual block sits and how its input is scaled."""
  index: int             # 0-based over the whole network.
  stage: int             # 0-based stage.
  first_in_stage: bool   # transition block (stride / channel change).
  beta: float            # 1 / expected std of the block's input.
  depth_fraction: float  # index / num_blocks (stochastic depth rate factor).


def block_schedule(depth: Sequence[int], alpha: float) -> List[BlockSlot]:
  """The signal-propagation schedule of the paper.

  beta = 1 / expected_std; after each block the expected variance grows by
  alpha^2, and it is reset to 1 after each transition block (whose shortcut
  is a fresh projection of the normalised input).
  """
  slots, expected_std, index, num_blocks = [], 1.0, 0, sum(depth)
  for stage, stage_depth in enumerate(depth):
    for block_index in range(stage_depth):
      slots.append(BlockSlot(index, stage, block_index == 0,
                             1.0 / expected_std, index / num_blocks))
      index += 1
      if block_index == 0:
        expected_std = 1.0
      expected_std = (expected_std ** 2 + alpha ** 2) ** 0.5
  return slots


def block_stats(x: jax.Array) -> Dict[str, jax.Array]:
  """Signal-propagation statistics of an NHWC activation (the paper's SPP):
  channel-averaged squared channel mean and channel variance (moments over
  batch and space)."""
  x = x.astype(jnp.float32)
  return {'avg_sq_mean': jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
          'avg_var': jnp.mean(jnp.var(x, axis=(0, 1, 2)))}


def run_blocks(blocks, x: jax.Array, is_training: bool, return_metrics: bool,
               outputs: Dict[str, jax.Array], remat: bool = False,
               features: Optional[Dict[str, jax.Array]] = None,
               block_stages: Sequence[int] = ()) -> jax.Array:
  """Applies residual blocks in order; with return_metrics, records each
  block's residual variance and output statistics into `outputs`. With
  remat, each block's activations are recomputed in the backward pass
  (hk.remat) instead of being kept: less memory, ~1/3 more compute.
  With a `features` dict, the output of each stage's last block (block i
  belongs to stage block_stages[i]) is stored as features['stage{s+1}']."""
  for i, block in enumerate(blocks):
    if remat:
      x, res_avg_var = hk.remat(lambda x, b=block: b(x, is_training))(x)
    else:
      x, res_avg_var = block(x, is_training)
    if return_metrics:
      outputs[f'block_{i}/res_avg_var'] = res_avg_var
      for k, v in block_stats(x).items():
        outputs[f'block_{i}/{k}'] = v
    if features is not None and (i + 1 == len(blocks)
                                 or block_stages[i + 1] != block_stages[i]):
      features[f'stage{block_stages[i] + 1}'] = x
  return x


def run_stem(convs: Sequence[hk.Module], activation: Callable,
             x: jax.Array) -> jax.Array:
  """A stack of stem convolutions with `activation` between them (not after
  the last: the first block activates its input)."""
  out = x
  for i, conv in enumerate(convs):
    out = conv(out)
    if i < len(convs) - 1:
      out = activation(out)
  return out


def blocks_and_head(model: hk.Module, stem_out: jax.Array,
                    head: Callable[[jax.Array], jax.Array], is_training: bool,
                    return_metrics: bool, return_features: bool
                    ) -> Dict[str, jax.Array]:
  """What every family's __call__ does after its stem: run `model.blocks`,
  `head` (final conv and/or activation), pool and classify; with
  return_features, also 'features': {'stem', 'stage1'..'stage4', 'final'}.

  `model` provides blocks, block_stages, remat, fc and drop_rate.
  """
  outputs, features = {}, ({} if return_features else None)
  if features is not None:
    features['stem'] = stem_out
  out = run_blocks(model.blocks, stem_out, is_training, return_metrics,
                   outputs, remat=model.remat, features=features,
                   block_stages=model.block_stages)
  out = head(out)
  if features is not None:
    features['final'] = out
    outputs['features'] = features
  return pool_and_classify(out, model.fc, model.drop_rate, is_training,
                           outputs)


def pool_and_classify(features: jax.Array, fc: 'Linear', drop_rate: float,
                      is_training: bool,
                      outputs: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """Global mean pool -> dropout -> classifier; logits in float32."""
  pool = jnp.mean(features, axis=(1, 2))
  outputs['pool'] = pool
  pool = dropout(pool, drop_rate, is_training)
  outputs['logits'] = fc(pool).astype(jnp.float32)
  return outputs
