"""MixUp/CutMix, RandAugment, label smoothing and normalisation in JAX.

With config.data.augment_on = 'device' the host pipeline (pipeline.py) ships
each output example's raw uint8 image(s) -- decoded, inception-cropped,
resized and flipped -- together with every random draw the host path would
have made for it (MixUp weight, CutMix box, RandAugment op / sign / Cutout
centre per layer; drawn on the host with the same stateless TF streams, so a
step's batch stays a pure function of (seed, data, layout) and resume stays
exact). `augment_batch` then does the per-pixel work on the accelerator with
the host path's maths: the two paths give the same batch up to float
rounding (tests/test_data_device_augment.py).

Device batch (per output row, so any split of the rows over devices works):
  'images'  uint8 [B, k, H, W, 3]   k = 2 raw images (mixing) or 1
  'labels'  int32 [B, k]
  'lam' float32 [B], 'box' int32 [B, 4]            (mixing only)
  'ra_op' int32 [..., L], 'ra_sign' float32 [..., L], 'ra_cut' int32 [..., L, 2]
      (RandAugment only; leading dims [B] after mixing, [B, k] before)
Output: {'images': normalised [B, H, W, 3] in data dtype, 'labels' float32
[B, C]}.

RandAugment on a batch: under vmap a per-example `lax.switch` runs all 16
branches anyway, so each layer computes every op's candidate for the whole
batch and selects per example -- but the five geometric ops (Rotate, ShearX/Y,
TranslateX/Y) share ONE nearest-neighbour gather with a per-example affine
matrix (identity for the other ops), and the point-wise ops fuse into one
pass. What remains per layer: one gather, one histogram (Equalize), one 3x3
filter (Sharpness), per-channel min/max (AutoContrast).
"""
import math
from typing import Dict, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from nfnets.data import preprocess
from nfnets.data import randaugment as ra_lib

_OP = {name: i for i, name in enumerate(ra_lib.OP_NAMES)}
_GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


def _trunc_uint8(x):
  """As the release: clip to 0..255, cast (truncates)."""
  return jnp.clip(x, 0., 255.).astype(jnp.uint8)


def _blend(image1, image2, factor):
  """Float32 image1 + factor * (image2 - image1), clipped, truncated."""
  f1 = image1.astype(jnp.float32)
  f2 = image2.astype(jnp.float32)
  return _trunc_uint8(f1 + factor * (f2 - f1))


def _per_example(x, ndim: int = 4):
  """[N] -> [N, 1, 1, 1] for broadcasting against [N, H, W, C]."""
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim else x


def _grayscale(images):
  """uint8 [N, H, W, 3] -> uint8 [N, H, W, 1], tf.image.rgb_to_grayscale's
  arithmetic (x / 255, luma weights, * 255.5, saturating truncation)."""
  f = images.astype(jnp.float32) * np.float32(1. / 255.)
  w = np.array([0.2989, 0.5870, 0.1140], np.float32)
  g = f[..., 0:1] * w[0] + f[..., 1:2] * w[1] + f[..., 2:3] * w[2]
  return _trunc_uint8(g * np.float32(255.5))


def _no_fma(product):
  """The float32-rounded product, as TF's C++ kernel computes it: XLA/LLVM
  would otherwise fuse a*x + b into one multiply-add, which rounds ties such
  as -0.3 * 5 + 2 = 0.5 the other way (a select between the multiply and the
  add blocks the contraction; it is the identity for every non-NaN value)."""
  return jnp.where(jnp.isnan(product), jnp.zeros_like(product), product)


def _affine_nearest(images, mats):
  """Projective transform, nearest neighbour, fill 128 (ImageProjective-
  TransformV3's arithmetic: in = (a0 x + a1 y + a2, b0 x + b1 y + b2),
  std::round, out-of-image -> fill). mats float32 [N, 6], output -> input."""
  n, h, w, c = images.shape
  ys = jnp.arange(h, dtype=jnp.float32)[None, :, None]
  xs = jnp.arange(w, dtype=jnp.float32)[None, None, :]
  m = [mats[:, i, None, None] for i in range(6)]
  px = [_no_fma(m[0] * xs), _no_fma(m[1] * ys), _no_fma(m[3] * xs), _no_fma(m[4] * ys)]
  in_x = lax.round(px[0] + px[1] + m[2])  # half away from zero (std::round)
  in_y = lax.round(px[2] + px[3] + m[5])
  inside = (in_x >= 0) & (in_x < w) & (in_y >= 0) & (in_y < h)
  idx = (jnp.clip(in_y, 0, h - 1).astype(jnp.int32) * w +
         jnp.clip(in_x, 0, w - 1).astype(jnp.int32))
  flat = images.reshape(n, h * w, c)
  out = jnp.take_along_axis(flat, idx.reshape(n, h * w, 1), axis=1)
  out = out.reshape(n, h, w, c)
  return jnp.where(inside[..., None], out, jnp.uint8(ra_lib.FILL_VALUE))


def _geometric_mats(op, sign, consts, h: int, w: int):
  """Per-example affine matrices [N, 6]: the op's for geometric ops, the
  identity for the others (their gather is then a copy)."""
  one = jnp.ones_like(sign)
  zero = jnp.zeros_like(sign)
  deg = sign * consts['rotate']
  rad = deg * np.float32(math.pi / 180.)
  cos, sin = jnp.cos(rad), jnp.sin(rad)
  hf, wf = np.float32(h), np.float32(w)
  x_off = ((wf - 1) - (cos * (wf - 1) - sin * (hf - 1))) / 2.
  y_off = ((hf - 1) - (sin * (wf - 1) + cos * (hf - 1))) / 2.
  shear = sign * consts['shear']
  shift = sign * consts['translate']
  table = {
      'Rotate': (cos, -sin, x_off, sin, cos, y_off),
      'ShearX': (one, shear, zero, zero, one, zero),
      'ShearY': (one, zero, zero, shear, one, zero),
      'TranslateX': (one, zero, shift, zero, one, zero),
      'TranslateY': (one, zero, zero, zero, one, shift),
  }
  mats = jnp.stack([one, zero, zero, zero, one, zero], -1)
  for name in _GEOMETRIC:
    mats = jnp.where((op == _OP[name])[:, None], jnp.stack(table[name], -1), mats)
  return mats


def _autocontrast(images):
  f = images.astype(jnp.float32)
  lo = jnp.min(f, axis=(1, 2), keepdims=True)
  hi = jnp.max(f, axis=(1, 2), keepdims=True)
  scale = 255. / jnp.maximum(hi - lo, 1.)
  return jnp.where(hi > lo, _trunc_uint8(f * scale + (-lo * scale)), images)


def _equalize(images):
  """Per-channel histogram equalisation, PIL's integer rule (as the host)."""
  n, h, w, c = images.shape
  x = images.astype(jnp.int32).transpose(0, 3, 1, 2).reshape(n * c, h * w)
  hist = jax.vmap(lambda v: jnp.bincount(v, length=256))(x)  # [nc, 256]
  last = jnp.take_along_axis(hist, jnp.max(x, axis=1, keepdims=True), axis=1)
  step = (jnp.sum(hist, axis=1, keepdims=True) - last) // 255
  safe = jnp.maximum(step, 1)
  lut = (jnp.cumsum(hist, axis=1) + safe // 2) // safe
  lut = jnp.clip(jnp.concatenate([jnp.zeros_like(lut[:, :1]), lut[:, :-1]], 1), 0, 255)
  out = jnp.where(step > 0, jnp.take_along_axis(lut, x, axis=1), x)
  return out.reshape(n, c, h, w).transpose(0, 2, 3, 1).astype(jnp.uint8)


def _sharpness_degenerate(images):
  """3x3 smoothing ([[1,1,1],[1,5,1],[1,1,1]] / 13), truncated; border kept."""
  f = images.astype(jnp.float32)
  h, w = images.shape[1:3]
  acc = None
  for dy in range(3):
    for dx in range(3):
      weight = np.float32(5. if dy == dx == 1 else 1.) / np.float32(13.)
      term = f[:, dy:dy + h - 2, dx:dx + w - 2] * weight
      acc = term if acc is None else acc + term
  inner = _trunc_uint8(acc)
  return images.at[:, 1:-1, 1:-1].set(inner)


def _cutout(images, cut, pad: int):
  h, w = images.shape[1:3]
  cy, cx = cut[:, 0, None, None], cut[:, 1, None, None]
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= cy - pad) & (rows < cy + pad) &
            (cols >= cx - pad) & (cols < cx + pad))
  return jnp.where(inside[..., None], jnp.uint8(ra_lib.FILL_VALUE), images)


def op_constants(magnitude: float, mode: str) -> Dict[str, float]:
  """Magnitude -> op arguments, in the host's (release's) arithmetic:
  l = m / 10 in float64, int() truncation, float32 for float arguments."""
  if mode not in ra_lib.MODES:
    raise ValueError(f'Unknown RandAugment mode {mode!r}; one of {ra_lib.MODES}')
  lvl = float(magnitude) / ra_lib.MAX_LEVEL
  bits = int(lvl * 4.)
  thr = int(lvl * 256.)
  release = mode == 'release'
  return {
      'rotate': np.float32(lvl * 30.), 'shear': np.float32(lvl * 0.3),
      'translate': np.float32(lvl * ra_lib.TRANSLATE_CONST),
      'cutout': int(lvl * ra_lib.CUTOUT_CONST), 'add': int(lvl * 110.),
      # Posterize: release shift min((8 - bits) mod 256, 7); PIL 8 - bits'.
      'shift': min((8 - bits) % 256, 7) if release else 8 - min(max(8 - bits, 0), 8),
      'threshold': thr % 256 if release else 256 - thr,
      'enhance': np.float32(lvl * 1.8 + 0.1) if release else np.float32(lvl * 0.9),
  }


def apply_layer(images, op, sign, cut, magnitude: float, mode: str = 'release'):
  """One RandAugment layer on a batch: op op[i] (index into OP_NAMES) on
  images[i], with the host's draws sign[i] (+-1) and cut[i] (Cutout centre).

  Args:
    images: uint8 [N, H, W, 3].
    op: int32 [N]; sign: float32 [N]; cut: int32 [N, 2].
    magnitude: the (static) magnitude.
    mode: 'release' or 'increasing' (see randaugment.py).
  """
  k = op_constants(magnitude, mode)
  images = jnp.asarray(images)
  n, h, w, _ = images.shape
  release = mode == 'release'
  x = images.astype(jnp.int32)
  if release:
    factor = k['enhance']
  else:
    factor = _per_example(1. + sign * k['enhance'])
  gray = _grayscale(images)
  if release:
    level = np.float32(min(h * w / 256., 255.))  # the release's grey (see host)
    grey_level = np.float32(int(level))
  else:
    mean = jnp.mean(gray.astype(jnp.float32), axis=(1, 2, 3), keepdims=True)
    grey_level = jnp.clip(jnp.floor(mean + 0.5), 0., 255.).astype(jnp.uint8)
  shift = k['shift']
  solarized = jnp.where(x < k['threshold'], x, 255 - x)
  candidates = {
      'AutoContrast': _autocontrast(images),
      'Equalize': _equalize(images),
      'Invert': 255 - images,
      'Posterize': ((x >> shift) << shift).astype(jnp.uint8) if shift < 8
                   else jnp.zeros_like(images),
      'Solarize': solarized.astype(jnp.uint8),
      'SolarizeAdd': jnp.where(x < 128, jnp.clip(x + k['add'], 0, 255), x
                               ).astype(jnp.uint8),
      'Color': _blend(jnp.broadcast_to(gray, images.shape), images, factor),
      'Contrast': _blend(jnp.broadcast_to(grey_level, images.shape).astype(jnp.float32),
                         images, factor),
      'Brightness': _blend(jnp.zeros_like(images), images, factor),
      'Sharpness': _blend(_sharpness_degenerate(images), images, factor),
      'Cutout': _cutout(images, cut, k['cutout']),
  }
  out = _affine_nearest(images, _geometric_mats(op, sign, k, h, w))
  sel = _per_example(op)
  for name, cand in candidates.items():
    out = jnp.where(sel == _OP[name], cand, out)
  return out


def randaugment_batch(images, ops, signs, cuts, magnitude: float,
                      mode: str = 'release'):
  """L layers (ops [N, L], signs [N, L], cuts [N, L, 2]) on uint8 [N, H, W, 3]."""
  for layer in range(ops.shape[1]):
    images = apply_layer(images, ops[:, layer], signs[:, layer],
                         cuts[:, layer], magnitude, mode)
  return images


def mix_pairs(images, lam, box):
  """uint8 [B, 2, H, W, C] -> float32 [B, H, W, C]: self weight lam outside
  the box, 0 inside (mix.py's maths, same operation order)."""
  h, w = images.shape[2:4]
  first = images[:, 0].astype(jnp.float32)
  second = images[:, 1].astype(jnp.float32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  b = [box[:, i, None, None] for i in range(4)]
  mask = ((rows >= b[0]) & (rows < b[1]) & (cols >= b[2]) & (cols < b[3])
          ).astype(jnp.float32)
  w_self = lam[:, None, None] * (1. - mask)
  return second + w_self[..., None] * (first - second)


def mix_labels(labels, lam, box, h: int, w: int):
  """Smoothed one-hot [B, 2, C] -> [B, C], self weight lam * (1 - box area)."""
  area = ((box[:, 1] - box[:, 0]).astype(jnp.float32) *
          (box[:, 3] - box[:, 2]).astype(jnp.float32) / np.float32(h * w))
  lw = (lam * (1. - area))[:, None]
  return lw * labels[:, 0] + (1. - lw) * labels[:, 1]


def one_hot_smoothed(labels, num_classes: int, smoothing: float):
  oh = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if smoothing:
    oh = oh * np.float32(1. - smoothing) + np.float32(smoothing / num_classes)
  return oh


def normalize(images):
  mean = np.array(preprocess.MEAN_RGB, np.float32)
  std = np.array(preprocess.STDDEV_RGB, np.float32)
  return (images.astype(jnp.float32) - mean) / std


def augment_batch(batch: Dict[str, jax.Array], *, num_classes: int,
                  smoothing: float = 0., randaug=None, mode: str = 'release',
                  before_mix: bool = False, dtype=jnp.float32
                  ) -> Dict[str, jax.Array]:
  """Device batch (module doc) -> {'images', 'labels'} as the host path makes
  them. Pure and per row: jit it, or call it inside a per-device step.

  Args:
    batch: the device batch (uint8 images, int labels, the host's draws).
    num_classes: one-hot width.
    smoothing: label smoothing.
    randaug: (num_layers, magnitude) or None.
    mode: RandAugment magnitude mapping ('release' / 'increasing').
    before_mix: RandAugment the raw images (True) or the mixed one.
    dtype: output image dtype (config.data.dtype).
  """
  images = batch['images']
  b, k, h, w, c = images.shape
  labels = one_hot_smoothed(batch['labels'], num_classes, smoothing)
  if randaug and before_mix:
    flat = images.reshape(b * k, h, w, c)
    flat = randaugment_batch(
        flat, batch['ra_op'].reshape(b * k, -1), batch['ra_sign'].reshape(b * k, -1),
        batch['ra_cut'].reshape(b * k, -1, 2), randaug[1], mode)
    images = flat.reshape(b, k, h, w, c)
  if k == 2:
    out = mix_pairs(images, batch['lam'], batch['box'])
    labels = mix_labels(labels, batch['lam'], batch['box'], h, w)
  else:
    out, labels = images[:, 0], labels[:, 0]
  if randaug and not before_mix:
    out = randaugment_batch(_trunc_uint8(out.astype(jnp.float32)), batch['ra_op'],
                            batch['ra_sign'], batch['ra_cut'], randaug[1], mode)
  return {'images': normalize(out).astype(dtype), 'labels': labels}


def make_batch_transform(data_config) -> Optional[callable]:
  """The transform for a (resolved) data config, or None with
  augment_on='host'. Apply it to each per-device train batch; a finished
  batch (images [B, H, W, 3]) passes through unchanged."""
  where = str(data_config.augment_on)
  if where not in ('device', 'host'):
    raise ValueError(f"config.data.augment_on must be 'device' or 'host', got {where!r}.")
  if where == 'host':
    return None
  if data_config.num_classes is None:
    raise ValueError('config.data.num_classes is None: resolve the config first '
                     '(nfnets.config.resolve).')
  mixing = bool(data_config.mixup_alpha or data_config.cutmix)
  randaug = preprocess.parse_randaug(data_config.randaug)
  kwargs = dict(
      num_classes=int(data_config.num_classes),
      smoothing=float(data_config.label_smoothing or 0.), randaug=randaug,
      mode=str(data_config.randaug_mode),
      before_mix=not mixing or bool(data_config.augment_before_mix),
      dtype=jnp.dtype(str(data_config.dtype)))

  def transform(batch):
    if batch['images'].ndim == 4:  # a finished batch (e.g. benchmark.py's)
      return batch
    return augment_batch(batch, **kwargs)
  return transform


def with_batch_transform(train_step, transform):
  """train_step(state, batch, rng) with `transform` applied to the batch first
  (inside the per-device step, so it runs under pmap and shard_map alike)."""
  if transform is None:
    return train_step

  def step(state, batch, rng):
    return train_step(state, transform(batch), rng)
  return step
