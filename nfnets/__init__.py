"""nfnets: Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) in JAX/Haiku."""
__version__ = '0.1.0'

from nfnets import models  # noqa: F401
from nfnets import optim  # noqa: F401
from nfnets.optim import adaptive_grad_clip  # noqa: F401
