"""Normalizer-free model families in Haiku.

>>> import nfnets.models as models
>>> model_fn = models.forward_fn('F0', num_classes=1000)
>>> models.get_variant('F0').train_size
192
"""
from nfnets.models import cpu_conv
from nfnets.models.flops import count_flops
from nfnets.models.layers import (ACTIVATION_GAMMAS, CONV_LOWERINGS,
                                  FeatureInfo, Linear,
                                  SqueezeExcite, WSConv2D, activation_names,
                                  default_conv_lowering, get_activation,
                                  kernel_hook, stochastic_depth)
from nfnets.models.nf_regnet import NFRegNet
from nfnets.models.nf_resnet import NFResNet
from nfnets.models.nf_resnet_timm import TimmNFResNet
from nfnets.models.nfnet import NFBlock, NFNet
from nfnets.models.nfnet_l import NFNetL
from nfnets.models.registry import (build, count_params, feature_info,
                                    forward_fn, get_variant, init_params,
                                    param_shapes, variants)
from nfnets.models.variants import VARIANTS, VariantSpec
