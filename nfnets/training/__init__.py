"""Training: state, per-device steps, the pmap wrapper, the loop.

Run checkpoints live in nfnets.checkpoints (RunCheckpointer).

The loop (and with it TensorFlow, which feeds the input pipeline) is imported
lazily, so `nfnets.training.step` and friends load without TensorFlow.
"""
from nfnets.training.parallel import (AXIS, pmap_eval_step, pmap_train_step,
                                      replicate, unreplicate)
from nfnets.training.state import TrainState
from nfnets.training.step import make_eval_step, make_train_step

_LAZY = {
    'train_and_evaluate': 'nfnets.training.loop',
    'NonFiniteError': 'nfnets.training.loop',
}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
