"""Small test images: smooth random pictures and an ImageFolder tree."""
import io
import os

import numpy as np
from PIL import Image


def photo(rng, h, w, channels=3):
  """Smooth random image (JPEG-friendly, so JPEG ~ PNG after decoding)."""
  low = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
  mode = 'L' if channels == 1 else 'RGB'
  img = Image.fromarray(low[..., 0] if channels == 1 else low, mode)
  return np.asarray(img.resize((w, h), Image.BILINEAR))


def encode(array, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kw)
  return buf.getvalue()


CLASSES = ('cat', 'dog', 'zebra')


def write_folder(root, seed=0):
  """train: 5 images per class (JPEG, PNG, upper-case extension, grey), one
  corrupt file in train/dog; val: 3 per class, one corrupt in val/cat."""
  rng = np.random.default_rng(seed)
  for split, per_class in (('train', 5), ('val', 3)):
    for c in CLASSES:
      d = os.path.join(root, split, c)
      os.makedirs(d)
      for i in range(per_class):
        pic = photo(rng, int(rng.integers(30, 60)), int(rng.integers(30, 60)))
        if i == 0:
          payload, name = encode(pic, 'PNG'), f'{c}{i}.png'
        elif i == 1:
          payload, name = encode(pic, 'JPEG'), f'{c}{i}.JPEG'
        elif i == 2:
          payload, name = encode(pic[..., 0], 'JPEG'), f'{c}{i}_grey.jpg'
        else:
          payload, name = encode(pic, 'PNG'), f'{c}{i}.PNG'
        with open(os.path.join(d, name), 'wb') as f:
          f.write(payload)
      with open(os.path.join(d, 'notes.txt'), 'w') as f:
        f.write('not an image, ignored')
  for path in (os.path.join(root, 'train', 'dog', 'broken.jpg'),
               os.path.join(root, 'val', 'cat', 'broken.png')):
    with open(path, 'wb') as f:
      f.write(b'this is not an image' * 10)
