"""Metric logging: console line, WORKDIR/metrics.jsonl and TensorBoard.

Only process 0 writes; other processes get a writer that does nothing.
"""
import json
import os
import time
from typing import Dict, Optional

from absl import logging


class MetricWriter:
  """Writes one JSON object per call to metrics.jsonl and scalars to
  TensorBoard (tensorboardX) under WORKDIR/tb.

  Args:
    workdir: run directory.
    enabled: False on non-zero processes.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
    except ImportError:  # TensorBoard is optional
      logging.warning('tensorboardX not installed: no TensorBoard summaries.')

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_duration(seconds: Optional[float]) -> str:
  if seconds is None or seconds != seconds:
    return '?'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'
