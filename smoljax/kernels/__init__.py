"""Pallas kernels: attention for GPU (Triton) and TPU (Mosaic)."""
