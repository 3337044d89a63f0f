"""Signal propagation at initialisation (the paper's SPP diagnostic)."""
import numpy as np

from nfnets.models import layers
import nfnets.models as M
from scripts import signal_prop


def test_nf_resnet50_variance_tracks_expected_schedule():
  rows = signal_prop.compute(
      'nf_resnet50', image_size=64, batch_size=8, skip_gain=1.0)
  slots = layers.block_schedule(M.get_variant('nf_resnet50').depth, 0.2)
  for i, row in enumerate(rows[:-1]):
    expected = 1.0 / slots[i + 1].beta ** 2  # what block i+1 assumes
    assert abs(row['avg_var'] / expected - 1) < 0.2, (i, row, expected)
  # Channel means stay small next to the variance (no mean shift).
  assert max(r['avg_sq_mean'] for r in rows) < 0.1


def test_f0_variance_near_one_with_skipinit():
  # At initialisation (skip gains 0) every block passes the signal through
  # its (projected) shortcut. The variance is ~1 out of the stem and first
  # block and never grows. (Each strided transition's 2x2 avg-pool shortcut
  # divides the variance of a spatially white signal by ~4, as in the
  # released architecture; the CSV of scripts/signal_prop.py shows it.)
  rows = signal_prop.compute('F0', image_size=64, batch_size=8,
                             skip_gain=0.0)
  assert len(rows) == 12
  stage_first = [0, 1, 3, 9]
  for i, row in enumerate(rows):
    assert np.isfinite(row['avg_var']) and row['avg_var'] < 1.5, (i, row)
  # Non-transition blocks are the identity at init: variance unchanged.
  for i in range(len(rows)):
    if i not in stage_first:
      np.testing.assert_allclose(rows[i]['avg_var'], rows[i - 1]['avg_var'],
                                 rtol=1e-4)
  np.testing.assert_allclose(rows[0]['avg_var'], 1.0, atol=0.15)
