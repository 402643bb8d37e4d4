"""moe-offload: run Mixture-of-Experts language models on hardware too small to hold them."""

from .api import GenerationResult, Runtime, load
from .errors import OffloadError

__version__ = "0.1.0"
__all__ = ["GenerationResult", "OffloadError", "Runtime", "load", "__version__"]
