"""nfnets: Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) in JAX/Haiku.

`import nfnets` is light (no JAX import): the subpackages load on first use,
e.g. `nfnets.models.forward_fn('F0')`, `nfnets.adaptive_grad_clip(...)`, or
`from nfnets import models`. This lets entry points configure the host
runtime (`nfnets.runtime.configure_cpu_runtime()`) before JAX starts.
"""
import importlib as _importlib
import typing as _typing

__version__ = '0.1.0'

_SUBMODULES = ('checkpoints', 'config', 'data', 'models', 'optim', 'runtime',
               'training')
# Names re-exported from subpackages: name -> module holding it.
_REEXPORTS = {'adaptive_grad_clip': 'nfnets.optim'}


def __getattr__(name: str) -> _typing.Any:
  if name in _SUBMODULES:
    return _importlib.import_module(f'nfnets.{name}')
  if name in _REEXPORTS:
    return getattr(_importlib.import_module(_REEXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> _typing.List[str]:
  return sorted(set(globals()) | set(_SUBMODULES) | set(_REEXPORTS))
