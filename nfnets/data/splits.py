"""Split arithmetic shared by every source: tfds split strings -> pieces.

A source describes its splits with `split_infos` (a mapping split name -> an
object with `.num_examples`, e.g. tfds' `builder.info.splits`). A split string
in tfds slicing syntax ('train', 'train[:90%]', 'train[10000:]+validation')
is resolved with tfds' own rules into an ordered list of absolute pieces
(split name, start, stop): a virtual list of examples that the pipeline
(nfnets/data/pipeline.py) cuts into per-host ranges and chunks.
"""
import dataclasses
from typing import List, Mapping, Sequence, Tuple

import tensorflow_datasets as tfds

from nfnets.errors import DataError

Piece = Tuple[str, int, int]  # (split name, start, stop), absolute indices.


@dataclasses.dataclass
class SplitLen:
  """Minimal split info for sources that are not tfds builders."""
  num_examples: int

  @property
  def shard_lengths(self):
    return [self.num_examples]


def resolve_split(split_infos: Mapping, split: str, *, where: str = '') -> List[Piece]:
  """tfds split string -> ordered list of absolute (name, start, stop) pieces.

  Raises DataError naming the available splits when `split` refers to a
  split the source does not have (`where` names the source in the message).
  """
  try:
    ri = tfds.core.ReadInstruction.from_spec(split)
    instructions = ri.to_absolute(split_infos)
  except (KeyError, ValueError, AssertionError) as e:
    available = sorted(split_infos) if split_infos else []
    raise DataError(
        f'Split {split!r} is not valid for {where or "this dataset"}: '
        f'{str(e).rstrip(".")}. '
        f'Available splits: {available} (tfds slicing syntax, e.g. '
        "'train[:90%]', 'train[10000:]+validation').") from None
  pieces = []
  for instr in instructions:
    n = split_infos[instr.splitname].num_examples
    start = 0 if instr.from_ is None else instr.from_
    stop = n if instr.to is None else instr.to
    if stop > start:
      pieces.append((instr.splitname, start, stop))
  return pieces


def pieces_len(pieces: Sequence[Piece]) -> int:
  return sum(b - a for _, a, b in pieces)


def slice_pieces(pieces: Sequence[Piece], start: int, stop: int) -> List[Piece]:
  """The sub-pieces covering virtual positions [start, stop) of `pieces`."""
  out, offset = [], 0
  for name, a, b in pieces:
    n = b - a
    lo, hi = max(start - offset, 0), min(stop - offset, n)
    if hi > lo:
      out.append((name, a + lo, a + hi))
    offset += n
  return out


def locate(pieces: Sequence[Piece], position: int) -> Tuple[str, int]:
  """(split name, absolute index) of virtual position `position` of `pieces`."""
  offset = 0
  for name, a, b in pieces:
    if position < offset + (b - a):
      return name, a + position - offset
    offset += b - a
  raise IndexError(f'position {position} beyond {offset} examples')


def train_host_range(n: int, process_index: int, process_count: int):
  """Equal, disjoint ranges; the < process_count remainder is dropped."""
  per_host = n // process_count
  return process_index * per_host, (process_index + 1) * per_host


def eval_host_range(n: int, process_index: int, process_count: int):
  """Ranges of size n//P or n//P + 1 covering all n examples."""
  base, rem = divmod(n, process_count)
  start = process_index * base + min(process_index, rem)
  return start, start + base + (1 if process_index < rem else 0)


def even_ranges(n: int, k: int):
  bounds = [(i * n) // k for i in range(k + 1)]
  return list(zip(bounds[:-1], bounds[1:]))
