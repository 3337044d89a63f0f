"""NFNet F-series (Brock et al. 2021b, arXiv 2102.06171) in Haiku.

The parameter tree matches DeepMind's released Haiku checkpoints:
'NFNet/~/stem_conv0'..'3', 'NFNet/~/nf_block', 'NFNet/~/nf_block_1', ... each
with conv0, conv1, conv1b, conv2, (conv_shortcut), squeeze_excite/~/linear,
squeeze_excite/~/linear_1 and the block's 'skip_gain'; 'NFNet/~/final_conv';
'NFNet/~/linear'.
"""
from typing import Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.variants import family_variant


def bottleneck_width(out_ch: int, expansion: float, group_size: int):
  """Returns (width, groups): out_ch * expansion rounded down to whole groups.

  A width below one group keeps its size as a single group (the original
  release crashed here with zero groups).
  """
  width = int(out_ch * expansion)
  if width < group_size:
    return max(1, width), 1
  groups = width // group_size
  return groups * group_size, groups


class NFBlock(hk.Module):
  """NFNet bottleneck residual block.

  out = act(x) * beta; shortcut = x, or [avgpool 2x2 if strided] + 1x1 conv of
  out when stride > 1 or channels change. Residual: 1x1 conv -> act -> grouped
  3x3 (stride) -> act -> grouped 3x3 -> act -> 1x1 conv -> SE (x2) ->
  stochastic depth -> x skip_gain (init 0). Returns out * alpha + shortcut.

  Args:
    in_ch: input channels.
    out_ch: output channels.
    expansion: bottleneck width = out_ch * expansion, rounded to groups.
    se_ratio: squeeze-excite hidden ratio.
    group_size: channels per group of the 3x3 convs.
    stride: stride of the first 3x3 conv (and the shortcut pool).
    beta: 1 / expected std of the input.
    alpha: residual branch scale.
    activation: gamma-scaled nonlinearity.
    stochdepth_rate: probability of dropping the residual branch.
    use_two_convs: use conv1b (the second grouped 3x3 conv).
    conv_lowering: None, 'xla' or 'cpu' (see layers.WSConv2D).
    name: module name (default 'nf_block').
  """

  def __init__(self, in_ch: int, out_ch: int, expansion: float = 0.5,
               se_ratio: float = 0.5, group_size: int = 128, stride: int = 1,
               beta: float = 1.0, alpha: float = 0.2,
               activation=layers.get_activation('gelu'),
               stochdepth_rate: float = 0.0, use_two_convs: bool = True,
               conv_lowering: Optional[str] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.stride = stride
    self.beta = beta
    self.alpha = alpha
    self.activation = activation
    self.stochdepth_rate = stochdepth_rate
    self.width, self.groups = bottleneck_width(out_ch, expansion, group_size)
    conv = lambda ch, k, s=1, g=1, name=None: layers.WSConv2D(
        ch, k, s, 'SAME', feature_group_count=g,
        conv_lowering=conv_lowering, name=name)
    self.conv0 = conv(self.width, 1, name='conv0')
    self.conv1 = conv(self.width, 3, stride, self.groups, name='conv1')
    self.conv1b = (conv(self.width, 3, 1, self.groups, name='conv1b')
                   if use_two_convs else None)
    self.conv2 = conv(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    self.conv_shortcut = (conv(out_ch, 1, name='conv_shortcut')
                          if self.use_projection else None)
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio,
                                   name='squeeze_excite')

  def __call__(self, x: jax.Array, is_training: bool):
    out = self.activation(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = x
    if self.stride > 1:
      shortcut = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
      shortcut = self.conv_shortcut(shortcut)
    elif self.use_projection:
      shortcut = self.conv_shortcut(out)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    if self.conv1b is not None:
      out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    out = (self.se(out) * 2) * out
    return layers.gated_residual(out, shortcut, self.alpha,
                                 self.stochdepth_rate, is_training)


class NFNet(hk.Module):
  """Normalizer-Free Network, F-series.

  Args:
    num_classes: classifier outputs.
    variant: 'F0'..'F7' or 'F0+'..'F7+' (see nfnets.models.variants).
    width: multiplier on the variant's stage widths (1.0 = the paper); the
      stem keeps its widths (16, 32, 64, stage-0 width / 2), as in the
      release.
    depth: optional override of the blocks per stage.
    group_size: channels per group in the 3x3 convs (128 in the paper).
    se_ratio: squeeze-excite hidden ratio (0.5).
    alpha: residual scale (0.2).
    stochdepth_rate: in [0, 1]; block i of n drops its residual branch with
      probability rate * i / n (0.25 in the released training config).
    drop_rate: dropout before the classifier (None: the variant's).
    activation: name of the scaled nonlinearity ('gelu').
    final_conv_mult: final 1x1 conv width = mult * last stage width (2).
    use_two_convs: two grouped 3x3 convs per block (True for NFNets).
    conv_lowering: None (backend default), 'xla' or 'cpu'; see
      layers.WSConv2D. Same parameters and function either way.
    remat: recompute each block's activations in the backward pass
      (hk.remat): less memory for large variants/batches, more compute.
    name: top module name; 'NFNet' matches the released checkpoints.
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'F0',
               width: float = 1.0, depth: Optional[Sequence[int]] = None,
               group_size: int = 128, se_ratio: float = 0.5,
               alpha: float = 0.2, stochdepth_rate: float = 0.25,
               drop_rate: Optional[float] = None, activation: str = 'gelu',
               final_conv_mult: float = 2.0, use_two_convs: bool = True,
               conv_lowering: Optional[str] = None, remat: bool = False,
               name: str = 'NFNet'):
    super().__init__(name=name)
    self.remat = remat
    spec = family_variant(variant, 'nfnet')
    layers.check_conv_lowering(conv_lowering)
    layers.check_stochdepth_rate(stochdepth_rate)
    self.spec = spec
    self.num_classes = num_classes
    self.drop_rate = spec.dropout if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    depth = tuple(depth) if depth is not None else spec.depth
    if len(depth) != 4 or min(depth) < 1:
      raise ValueError(f'depth must be 4 positive ints, got {depth}.')
    widths = [max(1, int(w * width)) for w in spec.width]
    conv = lambda ch, s, name: layers.WSConv2D(
        ch, 3, s, 'SAME', conv_lowering=conv_lowering, name=name)
    stem_ch = spec.width[0] // 2  # not scaled by `width` (as the release)
    self.stem = [conv(16, 2, 'stem_conv0'), conv(32, 1, 'stem_conv1'),
                 conv(64, 1, 'stem_conv2'), conv(stem_ch, 2, 'stem_conv3')]
    self.blocks = []
    ch = stem_ch
    schedule = layers.block_schedule(depth, alpha)
    self.block_stages = [b.stage for b in schedule]
    for b in schedule:
      stage_width = widths[b.stage]
      self.blocks.append(NFBlock(
          ch, stage_width, expansion=0.5, se_ratio=se_ratio,
          group_size=group_size,
          stride=(1, 2, 2, 2)[b.stage] if b.first_in_stage else 1,
          beta=b.beta, alpha=alpha, activation=self.activation,
          stochdepth_rate=stochdepth_rate * b.depth_fraction,
          use_two_convs=use_two_convs, conv_lowering=conv_lowering))
      ch = stage_width
    self.final_conv = layers.WSConv2D(int(final_conv_mult * ch), 1,
                                      conv_lowering=conv_lowering,
                                      name='final_conv')
    self.feature_info = layers.make_feature_info(
        (stem_ch, 4), widths, layers.stage_strides(4, 1),
        self.final_conv.output_channels)
    self.fc = layers.classifier(num_classes)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False,
               return_features: bool = False) -> Dict[str, jax.Array]:
    """Returns {'logits' (float32), 'pool'} (+ per-block stats if asked).

    With return_features, also 'features': {'stem', 'stage1'..'stage4',
    'final'} (see `feature_info`): the stem and stage outputs are the
    (pre-activation) residual stream, 'final' is the activated map that is
    pooled. Every stride-2 op pads 'SAME', so any input size works: a map
    of stride s is ceil(H / s) x ceil(W / s) (inputs not a multiple of 32
    get partial windows at the bottom/right edge). Same parameters either
    way.
    """
    out = layers.run_stem(self.stem, self.activation, x)
    return layers.blocks_and_head(
        self, out, lambda h: self.activation(self.final_conv(h)), is_training,
        return_metrics, return_features)
