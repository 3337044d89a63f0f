"""Peak throughput of known accelerators, for MFU reporting."""
from typing import Optional

# Dense peak TFLOP/s per device (chip), (bf16, f32). Matched by substring of
# jax.devices()[0].device_kind, first match wins (so specific names first).
PEAK_TFLOPS = [
    ('H100 PCIe', 756.0, 51.0),
    ('H100', 989.0, 67.0),       # SXM / HBM3
    ('H200', 989.0, 67.0),
    ('H20', 148.0, 44.0),
    ('A100', 312.0, 19.5),
    ('A10G', 70.0, 31.2),
    ('L4', 121.0, 30.3),
    ('V100', 125.0, 15.7),       # fp16 tensor cores (no bf16 on V100)
    ('TPU v3', 123.0, None),
    ('TPU v4', 275.0, None),
    ('TPU v5 lite', 197.0, None),
    ('TPU v5e', 197.0, None),
    ('TPU v5p', 459.0, None),
    ('TPU v5', 459.0, None),
    ('TPU v6', 918.0, None),
]


def peak_tflops_for(device_kind: str, dtype: str) -> Optional[float]:
  """Peak dense TFLOP/s of one device for dtype 'bf16' or 'f32', if known."""
  for key, bf16, f32 in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return bf16 if dtype in ('bf16', 'bfloat16') else f32
  return None


def train_flops_per_image(forward_macs: int) -> float:
  """Training FLOPs per image: forward + backward ~ 3 x forward, and one
  multiply-add = 2 FLOPs."""
  return 3.0 * 2.0 * forward_macs
