"""NF-ResNets (Brock et al. 2021a, arXiv 2101.08692) in Haiku.

Bottleneck ResNets (v1.5 strides: the 3x3 conv strides) without batch norm:
WS-convs, scaled ReLU, alpha/beta signal scaling, zero-init skip gains,
optional squeeze-excite (the NF-SE-ResNet variants), stochastic depth.

Module and parameter names follow DeepMind's release, so its Haiku params
load unchanged: 'NF_ResNet/~/initial_conv', 'NF_ResNet/~/nf_res_block',
'NF_ResNet/~/nf_res_block_1', ... each with conv0, conv1, conv2,
(conv_shortcut), (squeeze_excite/~/linear, squeeze_excite/~/linear_1) and the
block's 'skip_gain'; 'NF_ResNet/~/linear' (no final conv).
"""
from typing import Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.variants import family_variant


class NFResBlock(hk.Module):
  """NF-ResNet bottleneck block.

  Args:
    in_ch: input channels.
    out_ch: output channels.
    bottleneck_ratio: inner width = out_ch * ratio (0.25).
    stride: stride of the 3x3 conv and of the shortcut projection.
    beta: 1 / expected std of the input.
    alpha: residual branch scale.
    activation: gamma-scaled nonlinearity.
    stochdepth_rate: probability of dropping the residual branch.
    use_se: add squeeze-excite (ratio se_ratio) on the branch output.
    se_ratio: squeeze-excite hidden ratio.
    conv_lowering: None, 'xla' or 'cpu' (see layers.WSConv2D).
    name: module name (default 'nf_res_block', as in the release).
  """

  def __init__(self, in_ch: int, out_ch: int, bottleneck_ratio: float = 0.25,
               stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
               activation=layers.get_activation('relu'),
               stochdepth_rate: float = 0.0, use_se: bool = False,
               se_ratio: float = 0.25, conv_lowering: Optional[str] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.beta, self.alpha, self.activation = beta, alpha, activation
    self.stochdepth_rate = stochdepth_rate
    width = max(1, int(out_ch * bottleneck_ratio))
    conv = lambda ch, k, s, name: layers.WSConv2D(
        ch, k, s, conv_lowering=conv_lowering, name=name)
    self.conv0 = conv(width, 1, 1, 'conv0')
    self.conv1 = conv(width, 3, stride, 'conv1')
    self.conv2 = conv(out_ch, 1, 1, 'conv2')
    self.conv_shortcut = (conv(out_ch, 1, stride, 'conv_shortcut')
                          if stride > 1 or in_ch != out_ch else None)
    self.se = (layers.SqueezeExcite(out_ch, out_ch, se_ratio,
                                    name='squeeze_excite') if use_se else None)

  def __call__(self, x: jax.Array, is_training: bool):
    out = self.activation(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    if self.se is not None:
      out = (self.se(out) * 2) * out
    return layers.gated_residual(out, shortcut, self.alpha,
                                 self.stochdepth_rate, is_training)


class NFResNet(hk.Module):
  """Normalizer-Free ResNet.

  Args:
    num_classes: classifier outputs.
    variant: 'nf_resnet26|50|101|152|200' or 'nf_seresnet...'.
    width: multiplier on the stage widths (256, 512, 1024, 2048) and on the
      64-channel stem (the release's width=4 on (64, 128, 256, 512) and a
      16 * width stem is our 1.0).
    depth: optional override of the blocks per stage.
    alpha: residual scale (0.2).
    stochdepth_rate: in [0, 1]; block i of n drops its residual branch with
      probability rate * i / n.
    drop_rate: dropout before the classifier (None: 0.25).
    activation: scaled nonlinearity name ('relu').
    se_ratio: squeeze-excite ratio of the SE variants.
    conv_lowering: None (backend default), 'xla' or 'cpu'; see
      layers.WSConv2D. Same parameters and function either way.
    remat: recompute each block's activations in the backward pass.
    name: top module name; 'NF_ResNet' as in the release.
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'nf_resnet50',
               width: float = 1.0, depth: Optional[Sequence[int]] = None,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'relu',
               se_ratio: float = 0.25, conv_lowering: Optional[str] = None,
               remat: bool = False, name: str = 'NF_ResNet'):
    super().__init__(name=name)
    spec = family_variant(variant, 'nf_resnet')
    layers.check_conv_lowering(conv_lowering)
    layers.check_stochdepth_rate(stochdepth_rate)
    self.spec = spec
    self.remat = remat
    self.drop_rate = spec.dropout if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    depth = tuple(depth) if depth is not None else spec.depth
    widths = [max(1, int(w * width)) for w in spec.width]
    ch = max(1, int(64 * width))
    self.initial_conv = layers.WSConv2D(ch, 7, 2, conv_lowering=conv_lowering,
                                        name='initial_conv')
    self.blocks = []
    stem_ch = ch
    schedule = layers.block_schedule(depth, alpha)
    self.block_stages = [b.stage for b in schedule]
    for b in schedule:
      self.blocks.append(NFResBlock(
          ch, widths[b.stage],
          stride=(1, 2, 2, 2)[b.stage] if b.first_in_stage else 1,
          beta=b.beta, alpha=alpha, activation=self.activation,
          stochdepth_rate=stochdepth_rate * b.depth_fraction,
          use_se=spec.use_se, se_ratio=se_ratio, conv_lowering=conv_lowering))
      ch = widths[b.stage]
    self.feature_info = layers.make_feature_info(
        (stem_ch, 4), widths, layers.stage_strides(4, 1), widths[-1])
    self.fc = layers.classifier(num_classes)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False,
               return_features: bool = False) -> Dict[str, jax.Array]:
    """Returns {'logits', 'pool'} (+ per-block stats if asked).

    With return_features, also 'features': {'stem' (after the max-pool),
    'stage1'..'stage4' (pre-activation residual stream), 'final' (the
    activated map that is pooled)}; see `feature_info`. All padding is
    'SAME': a map of stride s is ceil(H / s) x ceil(W / s) for any input
    size. Same parameters either way.
    """
    out = self.initial_conv(x)
    out = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    return layers.blocks_and_head(
        self, out, self.activation, is_training,
        return_metrics, return_features)
