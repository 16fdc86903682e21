"""fastcsm: fast, streaming inference and serving for Sesame's CSM speech model.

`Generator`, `Segment` and `load_csm_1b` load torch when first used, not on `import fastcsm`:
the `fastcsm` command sets OpenMP's wait policy before torch starts (see threads.py).
"""

from .version import __version__

__all__ = ["Generator", "Segment", "__version__", "load_csm_1b"]


def __getattr__(name: str):
    if name in ("Generator", "load_csm_1b"):
        from . import generator

        return getattr(generator, name)
    if name == "Segment":
        from .model.prompt import Segment

        return Segment
    raise AttributeError(f"module 'fastcsm' has no attribute {name!r}")
