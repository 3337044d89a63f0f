"""MixUp and CutMix on a batch (TensorFlow, stateless randomness).

Each example i is mixed with example B-1-i of the same batch (the batch
reversed), as in the release. With both MixUp and CutMix on, half of each batch
(even positions) gets MixUp and the other half (odd positions) CutMix. The
mixing weight is drawn per example:
  * MixUp: lam ~ Beta(alpha, alpha); image = lam*x + (1-lam)*x_partner.
  * CutMix: box area fraction r ~ U(0, 1) (a box of uniform area), side
    sqrt(r) of the image's, centre uniform over the image, clipped at the
    borders and rounded to pixels; the box's pixels come from the partner. The
    label weight of the partner is the area actually pasted (after clipping and
    rounding), so the label matches the pixels exactly.
Labels must already be (smoothed) one-hot distributions; the mixed labels stay
distributions (non-negative, sum 1).

Implementation: `sample_params` draws the per-example parameters (cheap, tiny
tensors); `apply_params` does the per-pixel work and can run inside an
XLA-compiled function together with normalisation (see pipeline.py), so the
whole batch is mixed in one pass over memory.
"""
import tensorflow as tf


def _partner(x):
  return tf.reverse(x, axis=[0])


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


def sample_params(seed, batch_size, height, width, mixup_alpha: float = 0.0,
                  use_cutmix: bool = False):
  """Per-example mixing parameters.

  Returns dict: 'lam' float32 [B] (MixUp weight of the example itself; 1 for
  CutMix rows), 'box' int32 [B, 4] (CutMix box; empty for MixUp rows).
  """
  seed = tf.cast(seed, tf.int64)
  s_mix, s_cut = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  ones = tf.ones([batch_size], tf.float32)
  empty = tf.zeros([batch_size, 4], tf.int32)
  lam = sample_beta(s_mix, [batch_size], mixup_alpha) if mixup_alpha else ones
  box = cutmix_boxes(s_cut, batch_size, height, width) if use_cutmix else empty
  if mixup_alpha and use_cutmix:
    use_mixup = tf.equal(tf.range(batch_size) % 2, 0)
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


def apply_params(images, labels, params):
  """Mixes images [B, H, W, C] (any real dtype -> float32) and labels [B, K].

  Per pixel, the weight of the example itself is lam * (1 - in_box); the
  partner (reversed batch) gets the rest. Label weight of the example itself:
  lam * (1 - box_area).
  """
  shape = tf.shape(images)
  images = tf.cast(images, tf.float32)
  mask = box_masks(params['box'], shape[1], shape[2])
  lam = params['lam']
  w_self = lam[:, None, None] * (1. - mask)
  partner = _partner(images)
  out_images = partner + w_self[..., None] * (images - partner)
  lw = (lam * (1. - box_area(params['box'], shape[1], shape[2])))[:, None]
  out_labels = lw * labels + (1. - lw) * _partner(labels)
  return out_images, out_labels


def mixup(images, labels, seed, alpha: float):
  """Returns (images, labels, lam [B]) with lam the weight of the example itself."""
  shape = tf.shape(images)
  params = sample_params(seed, shape[0], shape[1], shape[2], alpha, False)
  return (*apply_params(images, labels, params), params['lam'])


def cutmix_masks(seed, batch_size, height, width):
  """[B, H, W] float masks, 1 inside each example's box (partner pixels)."""
  return box_masks(cutmix_boxes(seed, batch_size, height, width), height, width)


def cutmix(images, labels, seed):
  """Returns (images, labels, area [B]): area = fraction of pixels from the partner."""
  shape = tf.shape(images)
  params = sample_params(seed, shape[0], shape[1], shape[2], 0.0, True)
  return (*apply_params(images, labels, params),
          box_area(params['box'], shape[1], shape[2]))


def mixup_cutmix(images, labels, seed, mixup_alpha: float = 0.0,
                 use_cutmix: bool = False):
  """MixUp and/or CutMix as configured; both on: even rows MixUp, odd CutMix."""
  if not mixup_alpha and not use_cutmix:
    return images, labels
  shape = tf.shape(images)
  params = sample_params(seed, shape[0], shape[1], shape[2], mixup_alpha, use_cutmix)
  return apply_params(images, labels, params)
