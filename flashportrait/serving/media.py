"""Uploaded media: the reference image arrives as encoded bytes (PNG, JPEG, WebP, ...).

The image is opened with PIL and converted to RGB as the reference script does (REFERENCE.md 1.2).
Its size is read from the header and checked before any pixel is decoded, so an oversized upload
(or a decompression bomb) costs nothing; every failure is a `RequestError` a user can act on.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from flashportrait.serving.streaming import RequestError


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 RGB; RequestError for empty, unreadable, damaged or
    oversized (more than `max_pixels` pixels) images."""
    if not data:
        raise RequestError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit applies below; PIL's bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise RequestError(
                        f"the image is {width}x{height} pixels ({width * height / 1e6:.1f} MP); this "
                        f"server accepts at most {max_pixels / 1e6:.1f} MP (sampler max_image_pixels)",
                        code="INVALID_ARG",
                    )
                return np.array(opened.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise RequestError(f"the image is too large to decode: {error}") from None
    except UnidentifiedImageError:
        raise RequestError(
            f"cannot read the uploaded image ({len(data)} bytes) as an image: send PNG, JPEG or WebP bytes"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise RequestError(f"the image ({len(data)} bytes) is damaged: {error}") from None
