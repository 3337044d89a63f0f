"""DeepMind's released NFNet weight files, identified by MD5.

The release (github.com/deepmind/deepmind-research, directory nfnets/) ships
`F0_haiku.npz` ... `F6_haiku.npz` (F6 trained with SAM). `RELEASED_MD5` holds
the MD5 digests of those files as published, recorded by other ports of the
release; they were not re-computed from the files here (no download).

`check_file(path)` computes a file's MD5 and names the release it matches; a
file *named* like a release file (`F3_haiku.npz`) whose digest differs gets
one `ReleaseChecksumWarning` naming both digests (a partial download, or a
file re-saved by some tool: it may still load and validate).
"""
import dataclasses
import hashlib
import logging
import os
import re
import warnings
from typing import Optional

log = logging.getLogger(__name__)

# Source: the published MD5 of each released file (see module docstring).
RELEASED_MD5 = {
    'F0': '0a41039da1cb43adf47f1b7d86ddfe0f',
    'F1': 'c9126bbfaf855f9ddb7ff3b902558781',
    'F2': '7a018d8d1498020e2f5a8719a1e7f53f',
    'F3': 'd8e1e78d26db659c486150dbaccbe78a',
    'F4': 'f5974a7e3388aa81b91a9f1403e759a4',
    'F5': '8639e925de951030651ac775b9f915c3',
    'F6': 'b16cca40ac1ecec2bd5e3273866da0c1',
}
_RELEASE_NAME = re.compile(r'^(F[0-6])_haiku\.npz$')


class ReleaseChecksumWarning(UserWarning):
  """A file named like a released checkpoint has a different MD5."""


@dataclasses.dataclass(frozen=True)
class ReleaseCheck:
  """What a file is, by content and by name.

  Attributes:
    path: the file. md5: its digest (hex).
    release: the released variant whose digest it has ('F0'..'F6'), or None.
    named: the variant its file name claims ('F3' for F3_haiku.npz), or None.
  """
  path: str
  md5: str
  release: Optional[str]
  named: Optional[str]

  def describe(self) -> str:
    if self.release:
      return (f'MD5 {self.md5}: DeepMind\'s released {self.release}_haiku.npz '
              '(unmodified)')
    return f'MD5 {self.md5}: not one of DeepMind\'s released files'


def file_md5(path: str, chunk_bytes: int = 1 << 22) -> str:
  """Hex MD5 of a file, read in chunks."""
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk_bytes), b''):
      digest.update(block)
  return digest.hexdigest()


def check_file(path: str) -> ReleaseCheck:
  """MD5 of `path`, the release it matches, and one warning if its name says
  F<k>_haiku.npz but its digest is not that release's."""
  path = os.fspath(path)
  md5 = file_md5(path)
  release = next((v for v, d in RELEASED_MD5.items() if d == md5), None)
  match = _RELEASE_NAME.match(os.path.basename(path))
  named = match.group(1) if match else None
  check = ReleaseCheck(path, md5, release, named)
  if named is not None and release != named:
    warnings.warn(
        f'{path} is named like DeepMind\'s released {named} weights, but its '
        f'MD5 is {md5}, not the release\'s {RELEASED_MD5[named]}'
        + (f' (it is the released {release} file)' if release else '') +
        '. A partial download or a modified file; it is loaded and validated '
        'like any other checkpoint.', ReleaseChecksumWarning, stacklevel=3)
  elif release is not None:
    log.info('%s: %s', path, check.describe())
  return check
