"""Preemption: when SIGTERM reaches any host, ALL hosts save the same step
and exit.

On several processes (`jax.distributed.initialize()` done) this uses JAX's
preemption sync service (`jax.experimental.multihost_utils.
reached_preemption_sync_point`): the coordination service's preemption
notifier catches SIGTERM on whichever host receives it, tells every host, and
the hosts agree on a step (one past the largest step any host has reported)
at which `reached_preemption_sync_point(step)` returns True on all of them.
It requires every host to call it at every step, with the same step numbers.
On one process (no jax.distributed), SIGTERM simply sets a flag.

The loop's contract (call every step, on every host, after the step):

    watcher = PreemptionWatcher()
    for ...:
      state = train_step(state, batch)
      step += 1
      if watcher.should_stop(step):
        checkpointer.save(step, state, meta)
        checkpointer.close()      # waits for the (async) save
        return                    # exit 0; rerunning resumes at `step`
    watcher.close()

`should_stop` is cheap: a flag read on one process; a local query of the
coordination client's state on several (no collective, no device sync).
"""
import logging
import signal
from typing import Optional

log = logging.getLogger(__name__)


def _sync_manager():
  """JAX's preemption sync manager, or None without jax.distributed."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  state = distributed.global_state
  if state.client is None:
    return None
  return state.preemption_sync_manager


class PreemptionWatcher:
  """Says when every host must checkpoint and exit after a SIGTERM.

  Args:
    multihost: None = use JAX's preemption sync service when
      jax.distributed is initialised, else a SIGTERM flag; True requires the
      service (error if unavailable); False always uses the flag.
  """

  def __init__(self, multihost: Optional[bool] = None):
    manager = _sync_manager()
    if multihost and manager is None:
      raise RuntimeError(
          'PreemptionWatcher(multihost=True) needs jax.distributed.initialize() '
          'first, with the jax_enable_preemption_service option on (the '
          'default).')
    self.multihost = manager is not None if multihost is None else multihost
    self._requested = False
    self._old_handler = None
    self.stop_step: Optional[int] = None
    if not self.multihost:
      try:
        self._old_handler = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: no handler, never stops
        log.warning('PreemptionWatcher: not on the main thread, SIGTERM is '
                    'not watched.')
    # On several hosts JAX's notifier has installed its own SIGTERM handler
    # (a Python handler here would replace it).

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  @property
  def requested(self) -> bool:
    """Whether a stop was decided (after should_stop returned True), or a
    SIGTERM was seen on this (single) process."""
    return self._requested

  def should_stop(self, step: int) -> bool:
    """True once: at the step where all hosts must save and exit.

    Call after every step on every host with the same `step` (the number of
    steps done, i.e. the checkpoint's step).
    """
    if self.stop_step is not None:
      return step >= self.stop_step
    if self.multihost:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      stop = multihost_utils.reached_preemption_sync_point(int(step))
    else:
      stop = self._requested
    if stop:
      self._requested = True
      self.stop_step = int(step)
    return stop

  def close(self) -> None:
    """Puts the previous SIGTERM handler back (single process)."""
    if self._old_handler is not None:
      signal.signal(signal.SIGTERM, self._old_handler)
      self._old_handler = None
