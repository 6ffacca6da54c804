"""smoljax: SmolLM2 and SmolVLM2 as pure JAX functions."""
__version__ = "0.1.0"
