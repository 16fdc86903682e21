"""fastcsm: fast, streaming inference and serving for Sesame's CSM speech model."""

__version__ = "0.1.0"
