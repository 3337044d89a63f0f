"""Checkpoints: safe loading of DeepMind's released NFNet weights, our own
orbax checkpoints and plain .npz files; validation against the model;
merging for fine-tuning; export to PyTorch (timm dm_nfnet_*) layout.

>>> from nfnets import checkpoints
>>> params = checkpoints.load_pretrained('F0_haiku.npz')        # doctest: +SKIP
>>> params = checkpoints.merge_into(init_params, params)         # doctest: +SKIP
"""
from nfnets.checkpoints.errors import (CheckpointError, ParamMismatchError,
                                       TruncatedCheckpointError,
                                       UnsafeCheckpointError,
                                       VariantMismatchError)
from nfnets.checkpoints.released import (CLASSIFIER, NPZ_FORMAT, TreeSummary,
                                         flatten, infer_variant,
                                         init_from_checkpoint, load_pretrained,
                                         merge_into, read_params, save_npz,
                                         save_orbax, ORBAX_FORMAT,
                                         summarize, trainable_mask, unflatten,
                                         validate_params)
from nfnets.checkpoints.safe_pickle import (RestrictedUnpickler,
                                            allowed_globals, safe_load,
                                            safe_loads)
from nfnets.checkpoints.torch_layout import (from_torch_layout,
                                             load_torch_npz, save_torch_npz,
                                             save_torch_pt, to_torch_layout)
