"""Model definitions: every network of FlashPortrait, any size from an explicit config."""
