"""NF-RegNets (Brock et al. 2021a, arXiv 2101.08692, section 5) in Haiku.

RegNetY-style networks built from inverted bottlenecks (1x1 expand by 2.25,
grouped 3x3 with group width 8, squeeze-excite, 1x1 project) with the
normalizer-free ingredients, and an EfficientNet-like head (1x1 conv to
1280 * last_width / 440 channels). Widths/depths/image sizes from the table in
nfnets.models.variants, all scaled by the width factor 0.75. No released
weights exist to verify parameter counts against; the block follows the
paper's description and DeepMind's release.

Module and parameter names follow the release, so its Haiku params load
unchanged: 'NF_RegNet/~/initial_conv', 'NF_RegNet/~/nf_block',
'NF_RegNet/~/nf_block_1', ... each with conv0, conv1, squeeze_excite/~/linear,
squeeze_excite/~/linear_1, conv2, (conv_shortcut) and the block's
'skip_gain'; 'NF_RegNet/~/final_conv'; 'NF_RegNet/~/linear'.
"""
from typing import Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.nfnet import bottleneck_width
from nfnets.models.variants import family_variant


class NFRegNetBlock(hk.Module):
  """Inverted-bottleneck NF block.

  Args:
    in_ch: input channels.
    out_ch: output channels.
    expansion: inner width = in_ch * expansion, rounded to groups.
    se_ratio: squeeze-excite hidden ratio (of the inner width).
    group_size: channels per group of the 3x3 conv (8).
    stride: stride of the 3x3 conv (and shortcut avg-pool).
    beta: 1 / expected std of the input.
    alpha: residual scale.
    activation: gamma-scaled nonlinearity.
    stochdepth_rate: probability of dropping the residual branch.
    conv_lowering: None, 'xla' or 'cpu' (see layers.WSConv2D).
    name: module name (default 'nf_block', as in the release).
  """

  def __init__(self, in_ch: int, out_ch: int, expansion: float = 2.25,
               se_ratio: float = 0.5, group_size: int = 8, stride: int = 1,
               beta: float = 1.0, alpha: float = 0.2,
               activation=layers.get_activation('silu'),
               stochdepth_rate: float = 0.0,
               conv_lowering: Optional[str] = None,
               name: Optional[str] = 'nf_block'):
    super().__init__(name=name)
    self.stride, self.beta, self.alpha = stride, beta, alpha
    self.activation, self.stochdepth_rate = activation, stochdepth_rate
    width, groups = bottleneck_width(in_ch, expansion, group_size)
    conv = lambda ch, k, s=1, g=1, name=None: layers.WSConv2D(
        ch, k, s, feature_group_count=g, conv_lowering=conv_lowering,
        name=name)
    self.conv0 = conv(width, 1, name='conv0')
    self.conv1 = conv(width, 3, stride, groups, name='conv1')
    self.se = layers.SqueezeExcite(width, width, se_ratio,
                                   name='squeeze_excite')
    self.conv2 = conv(out_ch, 1, name='conv2')
    self.conv_shortcut = (conv(out_ch, 1, name='conv_shortcut')
                          if stride > 1 or in_ch != out_ch else None)

  def __call__(self, x: jax.Array, is_training: bool):
    out = self.activation(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = x
    if self.stride > 1:
      shortcut = hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
    elif self.conv_shortcut is not None:
      shortcut = out
    if self.conv_shortcut is not None:
      shortcut = self.conv_shortcut(shortcut)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = (self.se(out) * 2) * out
    out = self.conv2(self.activation(out))
    return layers.gated_residual(out, shortcut, self.alpha,
                                 self.stochdepth_rate, is_training)


class NFRegNet(hk.Module):
  """Normalizer-Free RegNet.

  Args:
    num_classes: classifier outputs.
    variant: 'nf_regnet_b0'..'nf_regnet_b8'.
    width: multiplier on the table's stage widths, stem and head (0.75, the
      paper's RegNetY width factor).
    depth: optional override of the blocks per stage.
    expansion: inverted-bottleneck expansion (2.25; 1 for the first block).
    group_size: group width of the 3x3 convs (8).
    se_ratio: squeeze-excite ratio (0.5).
    alpha: residual scale (0.2).
    stochdepth_rate: in [0, 1]; block i of n drops its residual branch with
      probability rate * i / n.
    drop_rate: dropout before the classifier (None: the variant's).
    activation: scaled nonlinearity name ('silu', a.k.a. 'swish').
    conv_lowering: None (backend default), 'xla' or 'cpu'; see
      layers.WSConv2D. Same parameters and function either way.
    remat: recompute each block's activations in the backward pass.
    name: top module name; 'NF_RegNet' as in the release.
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'nf_regnet_b0',
               width: float = 0.75, depth: Optional[Sequence[int]] = None,
               expansion: float = 2.25, group_size: int = 8,
               se_ratio: float = 0.5, alpha: float = 0.2,
               stochdepth_rate: float = 0.1, drop_rate: Optional[float] = None,
               activation: str = 'silu', conv_lowering: Optional[str] = None,
               remat: bool = False, name: str = 'NF_RegNet'):
    super().__init__(name=name)
    spec = family_variant(variant, 'nf_regnet')
    layers.check_conv_lowering(conv_lowering)
    layers.check_stochdepth_rate(stochdepth_rate)
    self.spec = spec
    self.remat = remat
    self.drop_rate = spec.dropout if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    depth = tuple(depth) if depth is not None else spec.depth
    widths = [max(1, int(w * width)) for w in spec.width]
    ch = max(1, int(spec.width[0] * width))
    self.initial_conv = layers.WSConv2D(ch, 3, 2, conv_lowering=conv_lowering,
                                        name='initial_conv')
    self.blocks = []
    stem_ch = ch
    schedule = layers.block_schedule(depth, alpha)
    self.block_stages = [b.stage for b in schedule]
    for b in schedule:
      self.blocks.append(NFRegNetBlock(
          ch, widths[b.stage], expansion=1.0 if b.index == 0 else expansion,
          se_ratio=se_ratio, group_size=group_size,
          stride=2 if b.first_in_stage else 1, beta=b.beta, alpha=alpha,
          activation=self.activation,
          stochdepth_rate=stochdepth_rate * b.depth_fraction,
          conv_lowering=conv_lowering))
      ch = widths[b.stage]
    # EfficientNet-like head: 1280 * (last stage width) // 440 channels,
    # rounded as the release (from the scaled last width).
    self.final_conv = layers.WSConv2D(max(1, 1280 * ch // 440), 1,
                                      conv_lowering=conv_lowering,
                                      name='final_conv')
    self.feature_info = layers.make_feature_info(
        (stem_ch, 2), widths, layers.stage_strides(2, 2),
        self.final_conv.output_channels)
    # Zero-initialised, as the release's NF_RegNet (fc_init=jnp.zeros).
    self.fc = layers.Linear(num_classes, w_init=jnp.zeros, name='linear')

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False,
               return_features: bool = False) -> Dict[str, jax.Array]:
    """Returns {'logits', 'pool'} (+ per-block stats if asked).

    With return_features, also 'features': {'stem' (the stride-2 initial
    conv), 'stage1'..'stage4' (pre-activation residual stream, strides 4..32),
    'final' (the activated head conv that is pooled)}; see `feature_info`.
    All padding is 'SAME': a map of stride s is ceil(H / s) x ceil(W / s)
    for any input size. Same parameters either way.
    """
    out = self.initial_conv(x)
    return layers.blocks_and_head(
        self, out, lambda h: self.activation(self.final_conv(h)), is_training,
        return_metrics, return_features)
