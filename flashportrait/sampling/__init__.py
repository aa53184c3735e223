"""Sampling: noise schedulers, context windows and the windowed denoising loop."""
