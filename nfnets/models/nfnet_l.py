"""timm's 'light' NFNets (ECA-NFNet-L0/L1/L2, NFNet-L0) in Haiku.

These variants exist only in timm (timm/models/nfnet.py, `eca_nfnet_l*`,
`nfnet_l0`); this module builds the same function with timm's numerics so
that timm's pretrained state dicts (nfnets.checkpoints.timm) give timm's
logits:

- every conv is timm's ScaledStdConv2d: w_hat = gain * gamma * (w - mean) /
  sqrt(fan_in * (var + 1e-5)) (eps inside the variance, not the release's
  1e-4 floor), with the activation's gamma folded into *every* kernel (also
  the stem's first conv and the head conv, whose inputs are not activations)
  and unscaled activations (so the pooled head features carry no gamma);
- PyTorch's symmetric padding ((stride - 1 + k - 1) // 2 on each side), not
  'SAME'; the shortcut's 2x2 average pool is PyTorch's ceil-mode pool without
  padded elements, which equals a 'SAME' average pool;
- no skip gain: residual = branch * alpha + shortcut, with the last 1x1 conv's
  gain initialised to 0 instead;
- channels rounded to multiples of 8 (timm's make_divisible); bottleneck =
  out_ch * 0.25, grouped 3x3s of 64 channels per group, two of them;
- attention after the last conv, times 2: ECA (a 1-D conv of k=5 taps
  across the pooled channels, no bias) or SE (hidden = out_ch / 4, ReLU).

Parameter tree: 'NFNet_L/~/stem_conv0'..'3', 'NFNet_L/~/nf_block[_k]' with
conv0, conv1, conv1b, conv2, (conv_shortcut) and 'eca' ('w': [k]) or
squeeze_excite/~/linear, linear_1; 'NFNet_L/~/final_conv';
'NFNet_L/~/linear'.
"""
import math
from typing import Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.variants import family_variant

_PLAIN_ACTIVATIONS = {
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # torch's GELU
}


def init_timm_family(module: hk.Module, variant: str, family: str, *,
                     depth: Optional[Sequence[int]], activation: str,
                     drop_rate: Optional[float], stochdepth_rate: float,
                     conv_lowering: Optional[str], remat: bool):
  """The arguments the timm-style families (NFNet-L, timm's NF-ResNet) share:
  checks them and sets module.spec, .remat, .drop_rate (the variant's when
  None) and .activation (a plain function: no gamma folded in). Returns
  (spec, depth), depth defaulting to the variant's."""
  spec = family_variant(variant, family)
  layers.check_conv_lowering(conv_lowering)
  layers.check_stochdepth_rate(stochdepth_rate)
  if activation not in _PLAIN_ACTIVATIONS:
    raise ValueError(f'activation must be one of '
                     f'{sorted(_PLAIN_ACTIVATIONS)}, got {activation!r}.')
  module.spec, module.remat = spec, remat
  module.drop_rate = spec.dropout if drop_rate is None else drop_rate
  module.activation = _PLAIN_ACTIVATIONS[activation]
  return spec, (tuple(depth) if depth is not None else spec.depth)


def make_divisible(value: float, divisor: int = 8,
                   round_limit: float = 0.9) -> int:
  """timm's channel rounding: nearest multiple of `divisor` (at least one),
  one more multiple if that lost more than 1 - round_limit of `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < round_limit * value:
    rounded += divisor
  return rounded


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
  """ECA-Net's adaptive 1-D kernel size (odd, at least 3), as timm."""
  t = int(abs(math.log(channels, 2) + beta) / gamma)
  return max(t if t % 2 else t + 1, 3)


class TimmWSConv2D(layers.WSConv2D):
  """WSConv2D with timm's ScaledStdConv2d numerics (see the module doc).

  Args:
    output_channels: number of output channels.
    kernel_shape: square kernel size.
    stride: stride.
    feature_group_count: groups.
    gamma: the activation's gamma, folded into the kernel.
    eps: added to the per-output variance (timm: 1e-5).
    gain_init: initial gain (0 for a block's last conv).
    conv_lowering: None, 'xla' or 'cpu' (see layers.WSConv2D).
    name: module name.
  """

  def __init__(self, output_channels: int, kernel_shape: int = 1,
               stride: int = 1, feature_group_count: int = 1,
               gamma: float = 1.0, eps: float = 1e-5, gain_init: float = 1.0,
               conv_lowering: Optional[str] = None,
               name: Optional[str] = None):
    pad = ((stride - 1) + (kernel_shape - 1)) // 2
    super().__init__(output_channels, kernel_shape, stride,
                     ((pad, pad), (pad, pad)), feature_group_count, eps,
                     conv_lowering, name=name, gain_init=gain_init)
    self.gamma = gamma

  def standardize(self, w: jax.Array, gain: jax.Array) -> jax.Array:
    w = w.astype(jnp.float32)
    fan_in = w.shape[0] * w.shape[1] * w.shape[2]
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    scale = jax.lax.rsqrt((var + self.eps) * fan_in) * (gain * self.gamma)
    return (w - mean) * scale


class ECA(hk.Module):
  """Efficient channel attention: sigmoid(conv1d_k(mean_hw(x))), [B,1,1,C].

  The 1-D conv runs across channels with zero padding (k - 1) // 2 and no
  bias (PyTorch cross-correlation order); its taps are the param 'w' [k].

  Args:
    channels: input channels (sets k).
    name: module name ('eca').
  """

  def __init__(self, channels: int, name: Optional[str] = None):
    super().__init__(name=name)
    self.kernel_size = eca_kernel_size(channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    bound = 1.0 / math.sqrt(k)  # torch Conv1d's default init
    w = hk.get_parameter('w', (k,), jnp.float32,
                         init=hk.initializers.RandomUniform(-bound, bound))
    y = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    c, p = y.shape[-1], (k - 1) // 2
    padded = jnp.pad(y, ((0, 0), (p, p)))
    out = sum(w[j] * padded[:, j:j + c] for j in range(k))
    return jax.nn.sigmoid(out).astype(x.dtype)[:, None, None, :]


class NFLBlock(hk.Module):
  """timm's NormFreeBlock as the L-variants configure it.

  out = act(x) * beta; shortcut = x, or [2x2 avg pool if strided] + 1x1 conv
  of out when stride > 1 or channels change. Branch: 1x1 -> act -> grouped
  3x3 (stride) -> act -> grouped 3x3 -> act -> 1x1 (gain init 0) ->
  2 * attention -> stochastic depth; returns branch * alpha + shortcut.

  Args:
    in_ch: input channels.
    out_ch: output channels.
    mid_ch: bottleneck width (a multiple of group_size, or one group).
    group_size: channels per group of the 3x3 convs.
    stride: stride of the first 3x3 conv and the shortcut pool.
    beta: 1 / expected std of the input.
    alpha: residual scale.
    activation: name of the (unscaled) nonlinearity.
    attention: 'eca' or 'se'.
    se_ratio: SE hidden = make_divisible(out_ch * se_ratio, 8).
    stochdepth_rate: probability of dropping the branch.
    conv_lowering: None, 'xla' or 'cpu'.
    name: module name (default 'nf_block').
  """

  def __init__(self, in_ch: int, out_ch: int, mid_ch: int, group_size: int,
               stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
               activation: str = 'silu', attention: str = 'eca',
               se_ratio: float = 0.25, stochdepth_rate: float = 0.0,
               conv_lowering: Optional[str] = None,
               name: Optional[str] = 'nf_block'):
    super().__init__(name=name)
    self.stride, self.beta, self.alpha = stride, beta, alpha
    self.activation = _PLAIN_ACTIVATIONS[activation]
    self.stochdepth_rate = stochdepth_rate
    gamma = layers.ACTIVATION_GAMMAS[activation]
    groups = max(1, mid_ch // group_size)
    conv = lambda ch, k, s=1, g=1, gain_init=1.0, name=None: TimmWSConv2D(
        ch, k, s, g, gamma=gamma, gain_init=gain_init,
        conv_lowering=conv_lowering, name=name)
    self.conv0 = conv(mid_ch, 1, name='conv0')
    self.conv1 = conv(mid_ch, 3, stride, groups, name='conv1')
    self.conv1b = conv(mid_ch, 3, 1, groups, name='conv1b')
    self.conv2 = conv(out_ch, 1, gain_init=0.0, name='conv2')
    self.conv_shortcut = (conv(out_ch, 1, name='conv_shortcut')
                          if stride > 1 or in_ch != out_ch else None)
    if attention == 'eca':
      self.attn = ECA(out_ch, name='eca')
    elif attention == 'se':
      hidden = make_divisible(out_ch * se_ratio, 8, round_limit=0.0)
      # SqueezeExcite's hidden = int(out_ch * ratio): hit `hidden` exactly.
      self.attn = layers.SqueezeExcite(out_ch, out_ch, (hidden + 0.5) / out_ch,
                                       name='squeeze_excite')
    else:
      raise ValueError(f"attention must be 'eca' or 'se', got {attention!r}.")

  def __call__(self, x: jax.Array, is_training: bool):
    out = self.activation(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = x
    if self.conv_shortcut is not None:
      pooled = (hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
                if self.stride > 1 else out)
      shortcut = self.conv_shortcut(pooled)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    out = (self.attn(out) * 2) * out
    res_avg_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = layers.stochastic_depth(out, self.stochdepth_rate, is_training)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, res_avg_var


class NFNetL(hk.Module):
  """timm's ECA-NFNet-L / NFNet-L networks (see the module docstring).

  Args:
    num_classes: classifier outputs.
    variant: 'eca_nfnet_l0'..'eca_nfnet_l2' or 'nfnet_l0'.
    width: multiplier on stem (128) and stage widths, rounded to 8 (timm's
      width_factor).
    depth: optional override of the blocks per stage.
    group_size: channels per group of the 3x3 convs (64).
    bottleneck_ratio: bottleneck width / output width (0.25).
    se_ratio: SE hidden ratio of nfnet_l0 (0.25).
    alpha: residual scale (0.2).
    stochdepth_rate: in [0, 1]; block i of n drops its branch with
      probability rate * i / n.
    drop_rate: dropout before the classifier (None: the variant's).
    activation: 'silu' (timm's), 'relu' or 'gelu' (unscaled; gamma goes into
      the convs).
    final_conv_mult: head conv = mult x last stage width (None: the
      variant's, 1.5 for L0, 2 for L1/L2).
    conv_lowering: None (backend default), 'xla' or 'cpu'.
    remat: recompute each block's activations in the backward pass.
    name: top module name ('NFNet_L').
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'eca_nfnet_l0',
               width: float = 1.0, depth: Optional[Sequence[int]] = None,
               group_size: int = 64, bottleneck_ratio: float = 0.25,
               se_ratio: float = 0.25, alpha: float = 0.2,
               stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'silu',
               final_conv_mult: Optional[float] = None,
               conv_lowering: Optional[str] = None, remat: bool = False,
               name: str = 'NFNet_L'):
    super().__init__(name=name)
    spec, depth = init_timm_family(
        self, variant, 'nfnet_l', depth=depth, activation=activation,
        drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
        conv_lowering=conv_lowering, remat=remat)
    if len(depth) != 4 or min(depth) < 1:
      raise ValueError(f'depth must be 4 positive ints, got {depth}.')
    widths = [make_divisible(w * width) for w in spec.width]
    stem_ch = make_divisible(128 * width)
    gamma = layers.ACTIVATION_GAMMAS[activation]
    conv = lambda ch, k, s, name: TimmWSConv2D(
        ch, k, s, gamma=gamma, conv_lowering=conv_lowering, name=name)
    self.stem = [conv(stem_ch // 8, 3, 2, 'stem_conv0'),
                 conv(stem_ch // 4, 3, 1, 'stem_conv1'),
                 conv(stem_ch // 2, 3, 1, 'stem_conv2'),
                 conv(stem_ch, 3, 2, 'stem_conv3')]
    schedule = layers.block_schedule(depth, alpha)
    self.block_stages = [b.stage for b in schedule]
    self.blocks, ch = [], stem_ch
    for b in schedule:
      out_ch = widths[b.stage]
      mid = make_divisible(out_ch * bottleneck_ratio)
      if mid >= group_size and group_size % 8 == 0:
        mid = group_size * (mid // group_size)
      self.blocks.append(NFLBlock(
          ch, out_ch, mid, group_size,
          stride=(1, 2, 2, 2)[b.stage] if b.first_in_stage else 1,
          beta=b.beta, alpha=alpha, activation=activation,
          attention=spec.attention, se_ratio=se_ratio,
          stochdepth_rate=stochdepth_rate * b.depth_fraction,
          conv_lowering=conv_lowering))
      ch = out_ch
    mult = spec.final_conv_mult if final_conv_mult is None else final_conv_mult
    self.final_conv = conv(make_divisible(int(spec.width[-1] * mult) * width),
                           1, 1, 'final_conv')
    self.feature_info = layers.make_feature_info(
        (stem_ch, 4), widths, layers.stage_strides(4, 1),
        self.final_conv.output_channels)
    self.fc = layers.classifier(num_classes)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False,
               return_features: bool = False) -> Dict[str, jax.Array]:
    """Returns {'logits' (float32), 'pool'} (+ per-block stats if asked).

    With return_features, also 'features': {'stem', 'stage1'..'stage4'
    (pre-activation residual stream), 'final' (the activated head conv that
    is pooled)}; see `feature_info`. Symmetric padding and ceil-mode pools
    give a map of stride s the size ceil(H / s) x ceil(W / s) for any input
    size (as timm). Same parameters either way.
    """
    out = layers.run_stem(self.stem, self.activation, x)
    return layers.blocks_and_head(
        self, out, lambda h: self.activation(self.final_conv(h)), is_training,
        return_metrics, return_features)
