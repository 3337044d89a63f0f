"""The train state: a small NamedTuple, replicated across devices."""
from typing import Any, NamedTuple

import jax.numpy as jnp


class TrainState(NamedTuple):
  """Everything a training step reads and writes.

  Attributes:
    params: float32 model parameters.
    opt_state: optax state of the optimizer chain.
    ema_params: exponential moving average of params (evaluated alongside).
    step: number of steps taken (int32 scalar).
    nonfinite: consecutive steps skipped for non-finite loss/gradients.
  """
  params: Any
  opt_state: Any
  ema_params: Any
  step: jnp.ndarray
  nonfinite: jnp.ndarray


def create(params, tx) -> TrainState:
  return TrainState(params=params, opt_state=tx.init(params),
                    ema_params=params, step=jnp.zeros((), jnp.int32),
                    nonfinite=jnp.zeros((), jnp.int32))
