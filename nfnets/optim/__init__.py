"""nfnets.optim: AGC, parameter-group masks, the optimizer chain (optimizer.py), EMA and SAM."""

from nfnets.optim.agc import adaptive_grad_clip
from nfnets.optim.agc import agc_states
from nfnets.optim.agc import agc_statistics
from nfnets.optim.agc import AGCState
from nfnets.optim.agc import clip_leaf
from nfnets.optim.agc import default_unit_axes
from nfnets.optim.agc import unitwise_norm
from nfnets.optim.ema import ema_decay
from nfnets.optim.ema import ema_update
from nfnets.optim.masks import AGC_GROUPS
from nfnets.optim.masks import agc_mask
from nfnets.optim.masks import CLASSIFIER_MODULE_REGEX
from nfnets.optim.masks import CLASSIFIER_REGEX
from nfnets.optim.masks import is_agc_excluded
from nfnets.optim.masks import is_classifier
from nfnets.optim.masks import is_classifier_module
from nfnets.optim.masks import NO_DECAY_NAMES
from nfnets.optim.masks import param_groups
from nfnets.optim.masks import param_labels
from nfnets.optim.masks import path_to_str
from nfnets.optim.masks import tree_paths
from nfnets.optim.masks import weight_decay_mask
from nfnets.optim.optimizer import AGC_CLIPPING_TABLE
from nfnets.optim.optimizer import agc_clipping_for_batch_size
from nfnets.optim.optimizer import agc_clipping_value
from nfnets.optim.optimizer import BY_BATCH
from nfnets.optim.optimizer import default_optim_config
from nfnets.optim.optimizer import FAMILY_FIELDS
from nfnets.optim.optimizer import LR_SCALINGS
from nfnets.optim.optimizer import make_optimizer
from nfnets.optim.optimizer import peak_learning_rate
from nfnets.optim.optimizer import training_steps
from nfnets.optim.optimizer import TrainingSteps
from nfnets.optim.optimizer import warmup_cosine_schedule
from nfnets.optim.sam import sam_gradients
from nfnets.optim.sam import sam_perturbation

__all__ = [
    'AGC_CLIPPING_TABLE',
    'AGC_GROUPS',
    'AGCState',
    'BY_BATCH',
    'CLASSIFIER_MODULE_REGEX',
    'CLASSIFIER_REGEX',
    'FAMILY_FIELDS',
    'LR_SCALINGS',
    'NO_DECAY_NAMES',
    'adaptive_grad_clip',
    'agc_states',
    'agc_statistics',
    'agc_clipping_for_batch_size',
    'agc_clipping_value',
    'agc_mask',
    'clip_leaf',
    'default_optim_config',
    'default_unit_axes',
    'ema_decay',
    'ema_update',
    'is_agc_excluded',
    'is_classifier',
    'is_classifier_module',
    'make_optimizer',
    'param_groups',
    'param_labels',
    'path_to_str',
    'peak_learning_rate',
    'sam_gradients',
    'sam_perturbation',
    'training_steps',
    'TrainingSteps',
    'tree_paths',
    'unitwise_norm',
    'warmup_cosine_schedule',
    'weight_decay_mask',
]
