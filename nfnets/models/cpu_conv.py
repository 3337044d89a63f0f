"""The XLA:CPU lowering of WSConv2D (`conv_lowering='cpu'`).

The same maths as one `jax.lax.conv_general_dilated` (and jnp.mean / jnp.var
weight standardisation), arranged around XLA:CPU's slow paths. Why each
rewrite (measurements: docs/benchmarking.md, "The CPU convolution lowering"):

* grouped convolutions: XLA:CPU expands feature groups into one dense conv
  (~groups times the work); one dense conv per group avoids it.
* 1x1 stride-1 convolutions: as convolutions, their weight gradient is
  lowered to a convolution over transposed activations ([C, H, W, B], the
  batch innermost) that runs several times slower than the forward pass; as a
  [B*H*W, C] x [C, O] matrix product the weight gradient is one more product.
* weight standardisation: XLA:CPU runs the per-output-channel column
  reductions (and their gradients) as single-threaded fusions; the same sums
  as [1, fan_in] x [fan_in, O] products are much faster.
* strided k x k convolutions on large maps: XLA computes their input gradient
  as one convolution over the stride-dilated output gradient, most of whose
  taps hit zeros; `_strided_conv_input_grad` runs one stride-1 convolution
  per output phase instead. On small maps the phase bookkeeping costs more
  than it saves, so they keep XLA's.

Not done (slower here): k x k weight gradients as im2col or per-tap products.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp

# Above this many groups the per-group split costs more (compile time,
# dispatch) than it saves; NF-RegNets' group width 8 gives up to hundreds of
# groups. `conv_lowering=None` on the CPU backend uses this lowering only for
# convolutions with at most this many groups.
MAX_SPLIT_GROUPS = 16
# Layouts of every convolution here: images NHWC, kernels HWIO.
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
_DN = DIMENSION_NUMBERS
# Inputs with at least this many pixels (H * W) get the phase-split input
# gradient when the convolution is strided.
_PHASE_GRAD_MIN_PIXELS = 48 * 48


def standardize_by_matmul(w: jax.Array, gain: jax.Array,
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


def conv(x: jax.Array, w: jax.Array, stride=1, padding='SAME',
             groups: int = 1) -> jax.Array:
  """Same result as conv_general_dilated(x, w, stride, padding,
  ('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups), arranged for
  XLA:CPU: one dense conv per group, 1x1 stride-1 convs as matrix products,
  phase-split input gradients for strided convs on large maps (see the module
  docstring).

  Args:
    x: input, NHWC.
    w: kernel, HWIO with I = C / groups.
    stride: int or (sh, sw).
    padding: 'SAME', 'VALID' or ((lo, hi), (lo, hi)).
    groups: feature groups.
  Returns:
    The NHWC output.
  """
  stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
  pads = _conv_pads(x.shape, w.shape[:2], stride, padding)
  if groups == 1:
    return _dense_conv(x, w, stride, pads)
  xs = jnp.split(x, groups, axis=-1)
  ws = jnp.split(w, groups, axis=-1)
  return jnp.concatenate([_dense_conv(a, b, stride, pads)
                          for a, b in zip(xs, ws)], axis=-1)


