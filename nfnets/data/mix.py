"""MixUp and CutMix as in the NFNet release: two raw images per output.

Each output example mixes two raw examples, and each raw example of a batch
is used exactly once (the release's `my_mixup` / `my_cutmix` /
`my_mixup_cutmix`, deepmind-research/nfnets/dataset.py). A raw batch of 2B
images gives B outputs:
  * MixUp only:  output i = mix(raw[i], raw[B + i]);
  * CutMix only: output i = cut(raw[i], raw[B + i]);
  * both: the first m = B - B // 2 outputs are MixUp of raw[:m] with
    raw[m:2m], the other c = B // 2 are CutMix of raw[2m:2m+c] with
    raw[2m+c:] (for even B: raw 4b -> b MixUp [:b] x [b:2b], b CutMix
    [2b:3b] x [3b:], exactly the release's layout).
The first image of a pair is the "self" example, the second the partner:
  * MixUp: lam ~ Beta(alpha, alpha) per output; image = lam*x + (1-lam)*x2.
  * CutMix: box area fraction r ~ U(0, 1) (a box of uniform area), side
    sqrt(r) of the image's, centre uniform over the image, clipped at the
    borders and rounded to pixels; the box's pixels come from the partner. The
    partner's label weight is the area actually pasted (after clipping and
    rounding), so the label matches the pixels exactly.
Labels must be (smoothed) one-hot distributions; mixed labels stay
distributions (non-negative, sum 1).

`sample_params` draws the per-output parameters (tiny tensors);
`apply_params` does the per-pixel work and can run inside an XLA-compiled
function together with normalisation (see pipeline.py).
"""
from typing import Tuple

import numpy as np
import tensorflow as tf


def num_mixup(num_outputs: int, mixup_alpha: float, use_cutmix: bool) -> int:
  """How many of `num_outputs` outputs are MixUp (the rest are CutMix)."""
  if mixup_alpha and use_cutmix:
    return num_outputs - num_outputs // 2
  return num_outputs if mixup_alpha else 0


def pair_indices(num_outputs: int, mixup_alpha: float, use_cutmix: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
  """(self, partner) raw indices [B] each; together a permutation of 2B."""
  b = num_outputs
  m = num_mixup(b, mixup_alpha, use_cutmix) if (mixup_alpha and use_cutmix) else b
  c = b - m
  first = np.concatenate([np.arange(m), 2 * m + np.arange(c)])
  second = np.concatenate([m + np.arange(m), 2 * m + c + np.arange(c)])
  return first.astype(np.int32), second.astype(np.int32)


def sample_beta(seed, shape, alpha: float):
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  g1 = tf.random.stateless_gamma(shape, s1, alpha=alpha)
  g2 = tf.random.stateless_gamma(shape, s2, alpha=alpha)
  return g1 / tf.maximum(g1 + g2, 1e-12)


def cutmix_boxes(seed, batch_size, height, width):
  """Per-example boxes [B, 4] int32 (y0, y1, x0, x1), half-open, clipped."""
  seed = tf.cast(seed, tf.int64)
  s_area, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  area = tf.random.stateless_uniform([batch_size], s_area)
  hf = tf.cast(height, tf.float32)
  wf = tf.cast(width, tf.float32)
  cut_h = tf.sqrt(area) * hf
  cut_w = tf.sqrt(area) * wf
  cy = tf.random.stateless_uniform([batch_size], s_y) * hf
  cx = tf.random.stateless_uniform([batch_size], s_x) * wf

  def edge(v, hi):
    return tf.cast(tf.round(tf.clip_by_value(v, 0., hi)), tf.int32)

  return tf.stack([edge(cy - cut_h / 2., hf), edge(cy + cut_h / 2., hf),
                   edge(cx - cut_w / 2., wf), edge(cx + cut_w / 2., wf)], axis=1)


def sample_params(seed, num_outputs: int, height, width, mixup_alpha: float = 0.0,
                  use_cutmix: bool = False):
  """Per-output mixing parameters.

  Returns dict: 'lam' float32 [B] (MixUp weight of the self image; 1 for
  CutMix outputs), 'box' int32 [B, 4] (CutMix box; empty for MixUp outputs).
  With both on, outputs [:num_mixup] are MixUp and the rest CutMix.
  """
  seed = tf.cast(seed, tf.int64)
  s_mix, s_cut = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  ones = tf.ones([num_outputs], tf.float32)
  empty = tf.zeros([num_outputs, 4], tf.int32)
  lam = sample_beta(s_mix, [num_outputs], mixup_alpha) if mixup_alpha else ones
  box = cutmix_boxes(s_cut, num_outputs, height, width) if use_cutmix else empty
  if mixup_alpha and use_cutmix:
    use_mixup = tf.range(num_outputs) < num_mixup(num_outputs, mixup_alpha, use_cutmix)
    lam = tf.where(use_mixup, lam, ones)
    box = tf.where(use_mixup[:, None], empty, box)
  return {'lam': lam, 'box': box}


def box_masks(box, height, width):
  """[B, H, W] float32, 1 inside each example's box."""
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width)[None, None, :]
  inside = ((rows >= box[:, 0, None, None]) & (rows < box[:, 1, None, None]) &
            (cols >= box[:, 2, None, None]) & (cols < box[:, 3, None, None]))
  return tf.cast(inside, tf.float32)


def box_area(box, height, width):
  """Fraction of the image inside each box, [B] float32."""
  h = tf.cast(box[:, 1] - box[:, 0], tf.float32)
  w = tf.cast(box[:, 3] - box[:, 2], tf.float32)
  return h * w / tf.cast(height * width, tf.float32)


def mix_pairs(first, second, labels_first, labels_second, params):
  """Mixes images first/second [B, H, W, C] (-> float32) and labels [B, K].

  Per pixel, the self weight is lam * (1 - in_box); the partner gets the rest.
  Label weight of the self example: lam * (1 - box_area).
  """
  shape = tf.shape(first)
  first = tf.cast(first, tf.float32)
  second = tf.cast(second, tf.float32)
  mask = box_masks(params['box'], shape[1], shape[2])
  lam = params['lam']
  w_self = lam[:, None, None] * (1. - mask)
  out_images = second + w_self[..., None] * (first - second)
  lw = (lam * (1. - box_area(params['box'], shape[1], shape[2])))[:, None]
  out_labels = lw * labels_first + (1. - lw) * labels_second
  return out_images, out_labels


def apply_params(images, labels, params, mixup_alpha: float, use_cutmix: bool):
  """Raw batch images [2B, H, W, C], labels [2B, K] -> B mixed outputs."""
  num_outputs = params['lam'].shape[0]
  if num_outputs is None:
    raise ValueError('params must have a static batch dimension.')
  first, second = pair_indices(num_outputs, mixup_alpha, use_cutmix)
  return mix_pairs(tf.gather(images, first), tf.gather(images, second),
                   tf.gather(labels, first), tf.gather(labels, second), params)


def _num_outputs(images) -> int:
  n = images.shape[0]
  if n is None or n % 2:
    raise ValueError(f'MixUp/CutMix need an even, static raw batch size, got {n}.')
  return n // 2


def mixup(images, labels, seed, alpha: float):
  """Raw [2B] -> (images [B], labels [B], lam [B] = weight of raw[i])."""
  shape = tf.shape(images)
  params = sample_params(seed, _num_outputs(images), shape[1], shape[2], alpha, False)
  return (*apply_params(images, labels, params, alpha, False), params['lam'])


def cutmix_masks(seed, batch_size, height, width):
  """[B, H, W] float masks, 1 inside each example's box (partner pixels)."""
  return box_masks(cutmix_boxes(seed, batch_size, height, width), height, width)


def cutmix(images, labels, seed):
  """Raw [2B] -> (images [B], labels [B], area [B] = fraction from raw[B+i])."""
  shape = tf.shape(images)
  params = sample_params(seed, _num_outputs(images), shape[1], shape[2], 0.0, True)
  return (*apply_params(images, labels, params, 0.0, True),
          box_area(params['box'], shape[1], shape[2]))


def mixup_cutmix(images, labels, seed, mixup_alpha: float = 0.0,
                 use_cutmix: bool = False):
  """MixUp and/or CutMix as configured (raw [2B] -> [B]); off: unchanged."""
  if not mixup_alpha and not use_cutmix:
    return images, labels
  shape = tf.shape(images)
  params = sample_params(seed, _num_outputs(images), shape[1], shape[2],
                         mixup_alpha, use_cutmix)
  return apply_params(images, labels, params, mixup_alpha, use_cutmix)
