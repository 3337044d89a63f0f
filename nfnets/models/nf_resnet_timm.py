"""timm's NF-ResNet (`nf_resnet50`, timm/models/nfnet.py) in Haiku.

Not the paper's NF-ResNet (nf_resnet.py): timm's shortcut is a 2x2 average
pool + 1x1 conv ('D' ResNet style) where the paper's is a strided 1x1 conv,
and it has timm's numerics (see nfnet_l.py: gamma folded into every conv,
eps 1e-5 inside the variance, PyTorch symmetric padding, no skip gain, the
last 1x1 conv's gain initialised to 0, the pooled features not scaled by
gamma). Its own family ('nf_resnet_timm') so that timm's pretrained
nf_resnet50 weights give timm's function.

Parameter tree: 'NF_ResNet_T/~/initial_conv' (7x7, stride 2, then a 3x3
stride-2 max pool padded by 1), 'NF_ResNet_T/~/nf_res_block[_k]' with conv0
(1x1), conv1 (3x3, strided), conv2 (1x1), (conv_shortcut);
'NF_ResNet_T/~/linear'.
"""
from typing import Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import layers
from nfnets.models.nfnet_l import (_PLAIN_ACTIVATIONS, TimmWSConv2D,
                                   init_timm_family, make_divisible)


class TimmNFResBlock(hk.Module):
  """timm's pre-activation NF bottleneck (no attention, one 3x3 conv).

  Args:
    in_ch: input channels.
    out_ch: output channels.
    mid_ch: bottleneck width.
    stride: stride of the 3x3 conv and the shortcut pool.
    beta: 1 / expected std of the input.
    alpha: residual scale.
    activation: name of the (unscaled) nonlinearity.
    stochdepth_rate: probability of dropping the branch.
    conv_lowering: None, 'xla' or 'cpu'.
    name: module name (default 'nf_res_block').
  """

  def __init__(self, in_ch: int, out_ch: int, mid_ch: int, stride: int = 1,
               beta: float = 1.0, alpha: float = 0.2,
               activation: str = 'relu', stochdepth_rate: float = 0.0,
               conv_lowering: Optional[str] = None,
               name: Optional[str] = 'nf_res_block'):
    super().__init__(name=name)
    self.stride, self.beta, self.alpha = stride, beta, alpha
    self.activation = _PLAIN_ACTIVATIONS[activation]
    self.stochdepth_rate = stochdepth_rate
    gamma = layers.ACTIVATION_GAMMAS[activation]
    conv = lambda ch, k, s=1, gain_init=1.0, name=None: TimmWSConv2D(
        ch, k, s, gamma=gamma, gain_init=gain_init,
        conv_lowering=conv_lowering, name=name)
    self.conv0 = conv(mid_ch, 1, name='conv0')
    self.conv1 = conv(mid_ch, 3, stride, name='conv1')
    self.conv2 = conv(out_ch, 1, gain_init=0.0, name='conv2')
    self.conv_shortcut = (conv(out_ch, 1, name='conv_shortcut')
                          if stride > 1 or in_ch != out_ch else None)

  def __call__(self, x: jax.Array, is_training: bool):
    out = self.activation(x) * jnp.asarray(self.beta, x.dtype)
    shortcut = x
    if self.conv_shortcut is not None:
      pooled = (hk.avg_pool(out, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')
                if self.stride > 1 else out)
      shortcut = self.conv_shortcut(pooled)
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    res_avg_var = jnp.mean(jnp.var(out.astype(jnp.float32), axis=(0, 1, 2)))
    out = layers.stochastic_depth(out, self.stochdepth_rate, is_training)
    return out * jnp.asarray(self.alpha, out.dtype) + shortcut, res_avg_var


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """PyTorch MaxPool2d(3, stride 2, padding 1): -inf padding on both sides."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1), pad)


class TimmNFResNet(hk.Module):
  """timm's NF-ResNet (see the module docstring).

  Args:
    num_classes: classifier outputs.
    variant: 'timm_nf_resnet50'.
    width: multiplier on stem (64) and stage widths, rounded to 8.
    depth: optional override of the blocks per stage.
    alpha: residual scale (0.2).
    stochdepth_rate: in [0, 1]; block i of n drops its branch with
      probability rate * i / n.
    drop_rate: dropout before the classifier (None: the variant's).
    activation: 'relu' (timm's), 'silu' or 'gelu'.
    conv_lowering: None (backend default), 'xla' or 'cpu'.
    remat: recompute each block's activations in the backward pass.
    name: top module name ('NF_ResNet_T').
  """

  def __init__(self, num_classes: int = 1000,
               variant: str = 'timm_nf_resnet50', width: float = 1.0,
               depth: Optional[Sequence[int]] = None, alpha: float = 0.2,
               stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None, activation: str = 'relu',
               conv_lowering: Optional[str] = None, remat: bool = False,
               name: str = 'NF_ResNet_T'):
    super().__init__(name=name)
    spec, depth = init_timm_family(
        self, variant, 'nf_resnet_timm', depth=depth, activation=activation,
        drop_rate=drop_rate, stochdepth_rate=stochdepth_rate,
        conv_lowering=conv_lowering, remat=remat)
    widths = [make_divisible(w * width) for w in spec.width]
    ch = make_divisible(64 * width)
    self.initial_conv = TimmWSConv2D(
        ch, 7, 2, gamma=layers.ACTIVATION_GAMMAS[activation],
        conv_lowering=conv_lowering, name='initial_conv')
    schedule = layers.block_schedule(depth, alpha)
    self.block_stages = [b.stage for b in schedule]
    self.feature_info = layers.make_feature_info(
        (ch, 4), widths, layers.stage_strides(4, 1), widths[-1])
    self.blocks = []
    for b in schedule:
      out_ch = widths[b.stage]
      self.blocks.append(TimmNFResBlock(
          ch, out_ch, make_divisible(out_ch * 0.25),
          stride=(1, 2, 2, 2)[b.stage] if b.first_in_stage else 1,
          beta=b.beta, alpha=alpha, activation=activation,
          stochdepth_rate=stochdepth_rate * b.depth_fraction,
          conv_lowering=conv_lowering))
      ch = out_ch
    self.fc = layers.classifier(num_classes)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False,
               return_features: bool = False) -> Dict[str, jax.Array]:
    """Returns {'logits', 'pool'} (+ per-block stats if asked).

    With return_features, also 'features': {'stem' (after the max-pool),
    'stage1'..'stage4' (pre-activation residual stream), 'final' (the
    activated stage4 that is pooled)}; a map of stride s is ceil(H / s) x
    ceil(W / s) for any input size. Same parameters either way.
    """
    out = _max_pool_3x3_s2(self.initial_conv(x))
    return layers.blocks_and_head(
        self, out, self.activation, is_training,
        return_metrics, return_features)
