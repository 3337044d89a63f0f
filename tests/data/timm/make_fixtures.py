"""Regenerates the timm fixtures of tests/test_checkpoints_timm.py.

Needs torch and timm (NOT dependencies of this package; install them in a
scratch environment). For each of timm's eca_nfnet_l0, nfnet_l0 and nf_resnet50, a tiny
configuration (blocks (1, 1, 1, 1), width_factor 0.0625, group size 8 for
the NFNets, 10 classes) with random weights (gains, biases and ECA taps perturbed so every
path matters) is saved as <name>_tiny.safetensors, and timm's logits and
pooled features for one fixed 37x41 image as <name>_tiny_ref.npz (image
NHWC). Run from this directory: python make_fixtures.py
"""
import numpy as np
import timm
import torch
from safetensors.torch import save_file

TINY = dict(depths=(1, 1, 1, 1), width_factor=0.0625, group_size=8)


def main():
  torch.manual_seed(0)
  for name in ('eca_nfnet_l0', 'nfnet_l0', 'nf_resnet50'):
    tiny = {k: v for k, v in TINY.items()
            if name != 'nf_resnet50' or k != 'group_size'}
    model = timm.create_model(name, num_classes=10, **tiny).eval()
    with torch.no_grad():
      for key, p in model.named_parameters():
        if key.endswith('.gain'):
          p.copy_(1 + 0.2 * torch.randn_like(p))
        elif key.endswith('.bias'):
          p.copy_(0.05 * torch.randn_like(p))
        elif 'attn_last.conv' in key:
          p.copy_(0.5 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, f'{name}_tiny.safetensors')
    x = torch.randn(1, 3, 37, 41)
    with torch.no_grad():
      logits = model(x)
      pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    np.savez(f'{name}_tiny_ref.npz', image=x.numpy().transpose(0, 2, 3, 1),
             logits=logits.numpy(), pool=pooled.numpy(),
             timm_version=np.array(timm.__version__),
             torch_version=np.array(torch.__version__))


if __name__ == '__main__':
  main()
