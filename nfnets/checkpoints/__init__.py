"""Checkpoints: safe loading of DeepMind's released NFNet weights, our own
run checkpoints (orbax; `RunCheckpointer`) and plain .npz files; validation
against the model; merging for fine-tuning; export to PyTorch (timm
dm_nfnet_*) layout; timm / Hugging Face `model.safetensors` (`read_timm`,
also through `load_pretrained`); multi-host preemption
(`PreemptionWatcher`).

>>> from nfnets import checkpoints
>>> params = checkpoints.load_pretrained('F0_haiku.npz')        # doctest: +SKIP
>>> params = checkpoints.merge_into(init_params, params)         # doctest: +SKIP

The run checkpointer and the preemption watcher (orbax / jax.distributed) are
imported on first use.
"""
from nfnets.checkpoints.errors import (CheckpointError,
                                       CheckpointMismatchError,
                                       CheckpointSaveError,
                                       CorruptCheckpointError,
                                       ParamMismatchError,
                                       TruncatedCheckpointError,
                                       UnsafeCheckpointError,
                                       VariantMismatchError)
from nfnets.checkpoints.formats import (NPZ_FORMAT, ORBAX_FORMAT, flatten,
                                        read_params, save_npz, save_orbax,
                                        unflatten)
from nfnets.checkpoints.pretrained import (CLASSIFIER, ModuleMatcher,
                                           TreeSummary, infer_variant,
                                           init_from_checkpoint,
                                           load_pretrained, merge_into,
                                           summarize, trainable_mask,
                                           validate_params)
from nfnets.checkpoints.release_files import (RELEASED_MD5, ReleaseCheck,
                                              ReleaseChecksumWarning,
                                              check_file, file_md5)
from nfnets.checkpoints.safe_pickle import (RestrictedUnpickler,
                                            allowed_globals, safe_load,
                                            safe_loads)
from nfnets.checkpoints.timm import (from_timm, is_safetensors,
                                     read_timm)
from nfnets.checkpoints.torch_layout import (from_torch_layout,
                                             load_torch_npz, save_torch_npz,
                                             save_torch_pt, to_torch_layout)

_LAZY = {
    'RunCheckpointer': 'nfnets.checkpoints.run',
    'restore_params': 'nfnets.checkpoints.run',
    'tree_signature': 'nfnets.checkpoints.run',
    'STATE_FIELDS': 'nfnets.checkpoints.run',
    'PreemptionWatcher': 'nfnets.checkpoints.preemption',
}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
