"""Training: state, per-device steps, the pmap wrapper, checkpoints, the loop."""
from nfnets.training.checkpointing import (CheckpointMismatchError,
                                           Checkpointer, restore_params)
from nfnets.training.loop import NonFiniteError, train_and_evaluate
from nfnets.training.parallel import (AXIS, pmap_eval_step, pmap_train_step,
                                      replicate, unreplicate)
from nfnets.training.state import TrainState
from nfnets.training.step import make_eval_step, make_train_step
