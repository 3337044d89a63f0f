"""NF-ResNets (Brock et al. 2021a, arXiv 2101.08692) in Haiku.

Bottleneck ResNets (v1.5 strides: the 3x3 conv strides) without batch norm:
WS-convs, scaled ReLU, alpha/beta signal scaling, zero-init skip gains,
optional squeeze-excite (the NF-SE-ResNet variants), stochastic depth.
"""
from typing import Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.variants import VARIANTS


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
    name: module name.
  """

  def __init__(self, in_ch: int, out_ch: int, bottleneck_ratio: float = 0.25,
               stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
               activation=layers.get_activation('relu'),
               stochdepth_rate: float = 0.0, use_se: bool = False,
               se_ratio: float = 0.25, name: Optional[str] = None):
    super().__init__(name=name)
    self.beta, self.alpha, self.activation = beta, alpha, activation
    self.stochdepth_rate = stochdepth_rate
    width = max(1, int(out_ch * bottleneck_ratio))
    self.conv0 = layers.WSConv2D(width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(width, 3, stride, name='conv1')
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.conv_shortcut = (layers.WSConv2D(out_ch, 1, stride,
                                          name='conv_shortcut')
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
    width: multiplier on the stage widths (256, 512, 1024, 2048).
    depth: optional override of the blocks per stage.
    alpha: residual scale (0.2).
    stochdepth_rate: final block's drop rate (linear in block index).
    drop_rate: dropout before the classifier (None: 0.25).
    activation: scaled nonlinearity name ('relu').
    se_ratio: squeeze-excite ratio of the SE variants.
    name: top module name.
  """

  def __init__(self, num_classes: int = 1000, variant: str = 'nf_resnet50',
               width: float = 1.0, depth: Optional[Sequence[int]] = None,
               alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'relu',
               se_ratio: float = 0.25, name: str = 'NFResNet'):
    super().__init__(name=name)
    if variant not in VARIANTS or VARIANTS[variant].family != 'nf_resnet':
      valid = [k for k, v in VARIANTS.items() if v.family == 'nf_resnet']
      raise ValueError(f'Unknown NF-ResNet variant {variant!r}; valid: {valid}.')
    spec = VARIANTS[variant]
    self.spec = spec
    self.drop_rate = spec.dropout if drop_rate is None else drop_rate
    self.activation = layers.get_activation(activation)
    depth = tuple(depth) if depth is not None else spec.depth
    widths = [max(1, int(w * width)) for w in spec.width]
    ch = max(1, int(64 * width))
    self.initial_conv = layers.WSConv2D(ch, 7, 2, name='initial_conv')
    self.blocks = []
    for b in layers.block_schedule(depth, alpha):
      self.blocks.append(NFResBlock(
          ch, widths[b.stage],
          stride=(1, 2, 2, 2)[b.stage] if b.first_in_stage else 1,
          beta=b.beta, alpha=alpha, activation=self.activation,
          stochdepth_rate=stochdepth_rate * b.depth_fraction,
          use_se=spec.use_se, se_ratio=se_ratio))
      ch = widths[b.stage]
    self.fc = layers.Linear(num_classes, w_init=jnp.zeros, name='linear')

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False) -> Dict[str, jax.Array]:
    outputs = {}
    out = self.initial_conv(x)
    out = hk.max_pool(out, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
    out = layers.run_blocks(self.blocks, out, is_training, return_metrics,
                            outputs)
    return layers.pool_and_classify(self.activation(out), self.fc,
                                    self.drop_rate, is_training, outputs)
