"""Triton-language GPU kernels (installed as ``flashportrait.kernels``)."""
