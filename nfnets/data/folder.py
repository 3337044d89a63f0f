"""An image-folder dataset (config.data.name = 'folder').

Layout (torchvision's ImageFolder, one folder per split):

  DIR/train/<class>/**/*.jpg|jpeg|png      (extensions in any case)
  DIR/val/<class>/**/*.jpg|jpeg|png        (optional; or DIR/validation/)

Class ids are the sorted class-folder names of DIR/train (0..C-1); DIR/val
must have exactly the same class folders. Files of a split are in sorted
relative-path order (so the order does not depend on the file system), and an
example's id is a hash of its path relative to DIR, stable across runs and
machines. Splits 'train' and 'val' (alias 'validation') take tfds slicing
syntax ('train[:90%]', 'train[90%:]', 'train+val'), through the same split
arithmetic, sharding, shuffling and resumption as every other source
(nfnets/data/pipeline.py).

Files are read in the pipeline's parallel decode stage; an undecodable file is
skipped there, and the train and eval iterators name the skipped files.
"""
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from nfnets.data import base
from nfnets.data import splits as splits_lib
from nfnets.errors import DataError

EXTENSIONS = ('.jpg', '.jpeg', '.png')
SPLIT_DIRS = {'train': 'train', 'val': 'val', 'validation': 'val'}
_BIG = 2 ** 62


def _path_id(rel_path: str) -> int:
  digest = hashlib.sha256(rel_path.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'little') % _BIG


def _list_split(root: str, split_dir: str) -> Tuple[List[str], List[str], List[int]]:
  """(class names, relative file paths, labels) of root/split_dir."""
  top = os.path.join(root, split_dir)
  classes = sorted(e.name for e in os.scandir(top) if e.is_dir())
  if not classes:
    raise DataError(f'{top} has no class folders: expected {top}/<class>/<image>.')
  paths, labels = [], []
  for label, cls in enumerate(classes):
    class_dir = os.path.join(top, cls)
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
      dirnames.sort()
      for f in filenames:
        if f.lower().endswith(EXTENSIONS):
          files.append(os.path.relpath(os.path.join(dirpath, f), root))
    if not files:
      raise DataError(f'Class folder {class_dir} holds no images '
                       f'({", ".join(EXTENSIONS)}, any case).')
    files.sort()
    paths.extend(files)
    labels.extend([label] * len(files))
  return classes, paths, labels


class FolderSource(base.Source):
  """DIR/train/<class>/* and DIR/val/<class>/*, see the module docstring."""

  def __init__(self, data_dir: Optional[str]):
    if not data_dir:
      raise DataError("config.data.name = 'folder' needs config.data.data_dir = "
                       'DIR holding DIR/train/<class>/* (and DIR/val/<class>/*).')
    self.root = os.path.abspath(os.path.expanduser(data_dir))
    self.name = f'folder {self.root}'
    if not os.path.isdir(os.path.join(self.root, 'train')):
      raise DataError(f'Image folder {self.root} has no train/ sub-folder: expected '
                       f'{self.root}/train/<class>/<image> (and {self.root}/val/...).')
    self.classes, train_paths, train_labels = _list_split(self.root, 'train')
    self._files: Dict[str, Tuple[List[str], np.ndarray]] = {
        'train': (train_paths, np.asarray(train_labels, np.int64))}
    val_dirs = [d for d in ('val', 'validation')
                if os.path.isdir(os.path.join(self.root, d))]
    if len(val_dirs) > 1:
      raise DataError(f'Image folder {self.root} has both val/ and validation/; '
                       'keep one (the evaluation split).')
    if val_dirs:
      val_classes, val_paths, val_labels = _list_split(self.root, val_dirs[0])
      if val_classes != self.classes:
        missing = sorted(set(self.classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(self.classes))
        raise DataError(
            f'Image folder {self.root}: the class folders of {val_dirs[0]}/ differ '
            f'from train/ (in train/ only: {missing[:10]}; in {val_dirs[0]}/ only: '
            f'{extra[:10]}). Both splits need the same class folders.')
      self._files['val'] = (val_paths, np.asarray(val_labels, np.int64))
    self.num_classes = len(self.classes)
    self.split_infos = {}
    self._tables = {}
    for split, folder in SPLIT_DIRS.items():
      if folder in self._files:
        paths, labels = self._files[folder]
        self.split_infos[split] = splits_lib.SplitLen(len(paths))
        self._tables[split] = (
            tf.constant([os.path.join(self.root, p) for p in paths]),
            tf.constant(labels),
            tf.constant(np.asarray([_path_id(p) for p in paths], np.int64)))

  def path(self, split: str, index: int) -> str:
    return os.path.join(self.root, self._files[SPLIT_DIRS[split]][0][index])

  cheap_read = True  # records are paths
  eval_splits = ('val',)  # default_splits: DIR/val (or DIR/validation)

  def describe(self, split: str, index: int) -> str:
    return self.path(split, index)

  def describe_record(self, record, example_id: int) -> str:
    del example_id
    return record.decode('utf-8') if isinstance(record, bytes) else str(record)

  def read(self, pieces: Sequence[splits_lib.Piece]) -> tf.data.Dataset:
    dss = []
    for split, a, b in pieces:
      paths, labels, ids = self._tables[split]
      dss.append(tf.data.Dataset.range(a, b).map(
          lambda i, p=paths, l=labels, d=ids: {
              'record': tf.gather(p, i), 'label': tf.gather(l, i),
              'id': tf.gather(d, i)}))
    return base.concat(dss)

  def load(self, record):
    # The record is the path: the file is read in the (parallel, guarded)
    # decode stage, so an unreadable file is skipped like an undecodable one.
    return tf.io.read_file(record)
