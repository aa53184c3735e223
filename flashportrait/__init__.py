"""FlashPortrait on Triton: portrait animation with a Wan2.1-I2V DiT, streamed for videos of any length."""

__version__ = "0.1.0"
