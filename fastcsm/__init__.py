"""fastcsm: fast, streaming inference and serving for Sesame's CSM speech model."""

from .generator import Generator, load_csm_1b
from .prompt import Segment

__version__ = "0.1.0"
__all__ = ["Generator", "Segment", "load_csm_1b"]
