"""Building blocks shared by every normalizer-free model family.

All modules create their parameters in float32, whatever the dtype of their
input, and compute in the dtype of their input. Feed bfloat16 images to get
bfloat16 compute with float32 master weights (the fix for the original
release, which created bfloat16 parameters when bf16 was on).
"""
import contextlib
import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import haiku as hk
import jax
import jax.numpy as jnp

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


# Above this many groups, 'split' costs more (compile time, dispatch) than it
# saves; NF-RegNets' group width 8 gives up to hundreds of groups.
MAX_SPLIT_GROUPS = 16
# Layouts of every convolution here: images NHWC, kernels HWIO.
_DN = ('NHWC', 'HWIO', 'NHWC')


_FORCED_IMPL = None


@contextlib.contextmanager
def reference_lowering():
  """Within this context WSConv2D uses the plain lowering ('native': one
  grouped XLA conv, jnp.mean / jnp.var weight standardisation) whatever its
  group_conv_impl, e.g. to count a model's FLOPs from its jaxpr without the
  extra products of the CPU lowering. Affects tracing only."""
  global _FORCED_IMPL
  old, _FORCED_IMPL = _FORCED_IMPL, 'native'
  try:
    yield
  finally:
    _FORCED_IMPL = old


def group_conv_impl_default(groups: int = 1) -> str:
  """'split' on CPU for a few groups (XLA:CPU grouped convs are ~10x slower
  than dense ones, see PAPER.md), 'native' elsewhere."""
  if jax.default_backend() == 'cpu' and groups <= MAX_SPLIT_GROUPS:
    return 'split'
  return 'native'


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
    group_conv_impl: 'native' (one grouped XLA conv), 'split' (one dense conv
      per group; same maths and parameter), or None for the backend default.
    name: module name.
  """

  def __init__(self,
               output_channels: int,
               kernel_shape: Union[int, Sequence[int]] = 3,
               stride: Union[int, Sequence[int]] = 1,
               padding: str = 'SAME',
               feature_group_count: int = 1,
               eps: float = 1e-4,
               group_conv_impl: Optional[str] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    if group_conv_impl not in (None, 'native', 'split'):
      raise ValueError(f'group_conv_impl must be None, "native" or "split", '
                       f'got {group_conv_impl!r}.')
    self.output_channels = output_channels
    self.kernel_shape = _pair(kernel_shape)
    self.stride = _pair(stride)
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.eps = eps
    self.group_conv_impl = group_conv_impl

  def _impl(self) -> str:
    if _FORCED_IMPL is not None:
      return _FORCED_IMPL
    return self.group_conv_impl or group_conv_impl_default(
        self.feature_group_count)

  def standardized_weight(self, in_channels: int) -> jax.Array:
    groups = self.feature_group_count
    if in_channels % groups or self.output_channels % groups:
      raise ValueError(
          f'{self.module_name}: channels in={in_channels} out='
          f'{self.output_channels} are not divisible by {groups} groups.')
    shape = self.kernel_shape + (in_channels // groups, self.output_channels)
    fan_in = shape[0] * shape[1] * shape[2]
    w = hk.get_parameter(
        'w', shape, jnp.float32,
        init=hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal'))
    gain = hk.get_parameter('gain', (self.output_channels,), jnp.float32,
                            init=jnp.ones)
    w = w.astype(jnp.float32)
    if self._impl() == 'split':
      return _standardize_by_matmul(w, gain, self.eps)
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, self.eps)) * gain
    return (w - mean) * scale

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.standardized_weight(x.shape[-1]).astype(x.dtype)
    bias = hk.get_parameter('bias', (self.output_channels,), jnp.float32,
                            init=jnp.zeros)
    groups = self.feature_group_count
    if self._impl() == 'split':
      out = cpu_conv(x, w, self.stride, self.padding, groups)
    else:
      out = jax.lax.conv_general_dilated(
          x, w, window_strides=self.stride, padding=self.padding,
          dimension_numbers=_DN,
          feature_group_count=groups)
    return out + bias.astype(out.dtype)


# ---------------------------------------------------------------------------
# CPU-oriented lowering (WSConv2D with group_conv_impl='split', the CPU
# default). Measured on XLA:CPU, jax 0.10.2, F0 forward+backward at batch 8,
# 192 px, 2 cores (CPU seconds per step, same process, interleaved runs):
# 4.2 s before, 3.8 s with the matmul weight standardisation, 2.6 s with
# 1x1 convolutions as matrix products as well. Why:
#  * grouped convolutions: XLA:CPU expands feature groups into a dense conv
#    (~10x the work); one dense conv per group avoids it.
#  * 1x1 stride-1 convolutions: as convolutions, their weight gradient is
#    lowered to a convolution over the transposed activations ([C, H, W, B],
#    with slow transposes whose innermost dimension is the batch) and runs
#    ~4x slower than the forward pass; as a [B*H*W, C] x [C, O] matrix
#    product, the weight gradient is one more product.
#  * weight standardisation: XLA:CPU runs the per-output-channel column
#    reductions (and their gradients) as slow single-threaded fusions (~100 ms
#    for F0's 1536 x 3072 final conv); [1, fan_in] x [fan_in, O] products
#    compute the same sums ~10x faster.
#  * strided k x k convolutions on large maps (>= 48 x 48 inputs): XLA
#    computes their input gradient as one convolution over the stride-dilated
#    output gradient, 3/4 of whose taps hit zeros at stride 2 (F0's
#    stem_conv3, 64->128 channels, 96 px, batch 8: 26.9 ms vs 8-10 ms for the
#    forward); `_strided_conv_input_grad` splits it into one stride-1
#    convolution per output phase instead (13.3 ms). On small maps the
#    phase bookkeeping costs more than it saves, so they keep XLA's.
# Tried and dropped: the k x k weight gradient as im2col or per-tap matrix
# products (long-K products with small outputs are slower than XLA's own
# weight-gradient convolution here).
# ---------------------------------------------------------------------------
# Inputs with at least this many pixels (H * W) get the phase-split input
# gradient when the convolution is strided.
_PHASE_GRAD_MIN_PIXELS = 48 * 48


def _standardize_by_matmul(w: jax.Array, gain: jax.Array,
                           eps: float) -> jax.Array:
  """Weight standardisation with the per-output-channel means over
  (H, W, I) written as [1, fan_in] x [fan_in, O] products (same maths as
  jnp.mean / jnp.var, both passes in float32)."""
  shape = w.shape
  fan_in = shape[0] * shape[1] * shape[2]
  w2 = w.reshape(fan_in, shape[-1])
  ones = jnp.full((1, fan_in), 1.0 / fan_in, w.dtype)
  hi = jax.lax.Precision.HIGHEST
  mean = jnp.dot(ones, w2, precision=hi)
  centered = w2 - mean
  var = jnp.dot(ones, centered * centered, precision=hi)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  return (centered * scale).reshape(shape)


def _same_pads(n: int, k: int, s: int) -> Tuple[int, int]:
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def _conv_pads(x_shape, kernel_hw, stride, padding):
  if isinstance(padding, str):
    if padding.upper() == 'SAME':
      return tuple(_same_pads(n, k, s) for n, k, s in
                   zip(x_shape[1:3], kernel_hw, stride))
    if padding.upper() == 'VALID':
      return ((0, 0), (0, 0))
    raise ValueError(f'Unknown padding {padding!r}.')
  return tuple(tuple(p) for p in padding)


def _phase_taps(n: int, k: int, s: int, pad_lo: int, n_out: int, p: int):
  """For the input positions r = s * m + p (m < rows) of a conv with kernel
  k, stride s and low padding pad_lo: (rows, first kernel tap k0, number of
  taps T, low/high padding of the output gradient). Those positions receive
  dy[m + d - t] * w[k0 + s * t] for t < T, with d = (p + pad_lo) // s."""
  rows = -(-(n - p) // s)
  k0 = (p + pad_lo) % s
  d = (p + pad_lo) // s
  taps = max(0, -(-(k - k0) // s))
  lo = taps - 1 - d
  return rows, k0, taps, lo, rows + taps - 1 - n_out - lo


def _strided_conv_input_grad(dy, w, x_shape, stride, pads):
  """d(conv(x, w, stride, pads))/dx applied to dy, as one stride-1
  convolution per phase (p, q) of the input grid, interleaved."""
  b, h, wd, c = x_shape
  (s_h, s_w), zero = stride, jnp.zeros((), dy.dtype)
  phases = []
  for p in range(s_h):
    rows, kh0, t_h, lo_h, hi_h = _phase_taps(h, w.shape[0], s_h, pads[0][0],
                                             dy.shape[1], p)
    row = []
    for q in range(s_w):
      cols, kw0, t_w, lo_w, hi_w = _phase_taps(wd, w.shape[1], s_w,
                                               pads[1][0], dy.shape[2], q)
      if not (t_h and t_w):
        row.append(jnp.zeros((b, rows, cols, c), dy.dtype))
        continue
      # Taps of this phase, flipped, mapping output to input channels.
      ker = jnp.swapaxes(w[kh0::s_h, kw0::s_w][::-1, ::-1], 2, 3)
      dyp = jax.lax.pad(dy, zero, ((0, 0, 0), (lo_h, hi_h, 0),
                                   (lo_w, hi_w, 0), (0, 0, 0)))
      row.append(jax.lax.conv_general_dilated(dyp, ker, (1, 1), 'VALID',
                                              dimension_numbers=_DN))
    phases.append(row)
  if h % s_h == 0 and wd % s_w == 0:  # equal phases: one interleaving copy
    stacked = jnp.stack([jnp.stack(row) for row in phases])
    return stacked.transpose(2, 3, 0, 4, 1, 5).reshape(x_shape)
  dx = jnp.zeros(x_shape, dy.dtype)
  for p, row in enumerate(phases):
    for q, phase in enumerate(row):
      dx = dx.at[:, p::s_h, q::s_w, :].set(phase)
  return dx


def _xla_conv(x, w, stride, pads):
  return jax.lax.conv_general_dilated(x, w, window_strides=stride,
                                      padding=pads, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x, w, stride, pads):
  return _xla_conv(x, w, stride, pads)


def _strided_conv_fwd(x, w, stride, pads):
  return _xla_conv(x, w, stride, pads), (x, w)


def _strided_conv_bwd(stride, pads, res, dy):
  x, w = res
  dw = jax.vjp(lambda w_: _xla_conv(x, w_, stride, pads), w)[1](dy)[0]
  return _strided_conv_input_grad(dy, w, x.shape, stride, pads), dw


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _dense_conv(x, w, stride, pads):
  if w.shape[:2] == (1, 1) and stride == (1, 1) and pads == ((0, 0), (0, 0)):
    b, h, wd, c = x.shape
    out = jnp.dot(x.reshape(b * h * wd, c), w.reshape(c, w.shape[-1]))
    return out.reshape(b, h, wd, w.shape[-1])
  if (stride != (1, 1) and w.shape[:2] != (1, 1)
      and x.shape[1] * x.shape[2] >= _PHASE_GRAD_MIN_PIXELS):
    return _strided_conv(x, w, stride, pads)
  return _xla_conv(x, w, stride, pads)


def cpu_conv(x: jax.Array, w: jax.Array, stride=1, padding='SAME',
             groups: int = 1) -> jax.Array:
  """Same result as conv_general_dilated(x, w, stride, padding,
  ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups), arranged for
  XLA:CPU: one dense conv per group, 1x1 stride-1 convs as matrix products
  (see the comment above)."""
  stride = _pair(stride)
  pads = _conv_pads(x.shape, w.shape[:2], stride, padding)
  if groups == 1:
    return _dense_conv(x, w, stride, pads)
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate([_dense_conv(a, b, stride, pads)
                          for a, b in zip(xs, ws)], axis=-1)


class Linear(hk.Module):
  """Dense layer with float32 parameters 'w' [in, out] and 'b' [out].

  Args:
    output_size: number of outputs.
    w_init: initializer of 'w' (default: variance scaling, fan_in, truncated).
    name: module name.
  """

  def __init__(self, output_size: int,
               w_init: Optional[hk.initializers.Initializer] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.w_init = w_init

  def __call__(self, x: jax.Array) -> jax.Array:
    w_init = self.w_init or hk.initializers.VarianceScaling(1.0, 'fan_in',
                                                            'truncated_normal')
    w = hk.get_parameter('w', (x.shape[-1], self.output_size), jnp.float32,
                         init=w_init)
    b = hk.get_parameter('b', (self.output_size,), jnp.float32,
                         init=jnp.zeros)
    return jnp.dot(x, w.astype(x.dtype)) + b.astype(x.dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-and-excite: sigmoid(fc1(relu(fc0(mean_hw(x))))) of shape [B,1,1,C].

  The caller multiplies by 2 (so that the expected gain is 1 at init).

  Args:
    in_ch: input channels.
    out_ch: output channels.
    se_ratio: hidden width = max(1, int(in_ch * se_ratio)).
    name: module name ('squeeze_excite'); its layers are 'linear', 'linear_1'.
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

  As in the release the kept branches are *not* rescaled by 1/keep_prob.
  Needs an hk rng key when is_training and drop_rate > 0.
  """
  if not is_training or drop_rate <= 0.0:
    return x
  keep_prob = 1.0 - drop_rate
  r = jax.random.uniform(hk.next_rng_key(), (x.shape[0], 1, 1, 1), jnp.float32)
  mask = jnp.floor(keep_prob + r).astype(x.dtype)
  return x * mask


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
               outputs: Dict[str, jax.Array], remat: bool = False) -> jax.Array:
  """Applies residual blocks in order; with return_metrics, records each
  block's residual variance and output statistics into `outputs`. With
  remat, each block's activations are recomputed in the backward pass
  (hk.remat) instead of being kept: less memory, ~1/3 more compute."""
  for i, block in enumerate(blocks):
    if remat:
      x, res_avg_var = hk.remat(lambda x, b=block: b(x, is_training))(x)
    else:
      x, res_avg_var = block(x, is_training)
    if return_metrics:
      outputs[f'block_{i}/res_avg_var'] = res_avg_var
      for k, v in block_stats(x).items():
        outputs[f'block_{i}/{k}'] = v
  return x


def pool_and_classify(features: jax.Array, fc: 'Linear', drop_rate: float,
                      is_training: bool,
                      outputs: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """Global mean pool -> dropout -> classifier; logits in float32."""
  pool = jnp.mean(features, axis=(1, 2))
  outputs['pool'] = pool
  pool = dropout(pool, drop_rate, is_training)
  outputs['logits'] = fc(pool).astype(jnp.float32)
  return outputs
