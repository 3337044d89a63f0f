"""Training: state, per-device steps, the device seam, setup and the loop.

The loop (nfnets.training.loop) is not imported here: it feeds the steps
from the TensorFlow input pipeline, and `nfnets.training` and its other
modules load without TensorFlow.
"""
from nfnets.training.parallel import AXIS, DataParallel, Pmap, make
from nfnets.training.setup import Setup, build, due, evaluate
from nfnets.training.state import TrainState
from nfnets.training.step import make_eval_step, make_train_step
