"""One decoding rule for every image the model sees, in training and at inference: upright as a viewer shows it
(its EXIF orientation applied), 8-bit RGB. CMYK, palette and grey images convert; an alpha channel is dropped (as
diffusers' `load_image` does); 16- and 32-bit greys keep their top 8 bits (PIL's plain conversion would clip them
to white)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag; 1 is upright, 2-8 flips and turns
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def upright_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """-> (8-bit RGB image, upright; whether it differs from PIL's plain `image.convert("RGB")`, i.e. it was turned by
    its EXIF orientation or rescaled from more than 8 bits)."""
    turned = image.getexif().get(ORIENTATION, 1) in range(2, 9)
    if turned:
        image = ImageOps.exif_transpose(image)
    wide = image.mode in SIXTEEN_BIT or image.mode in ("I", "F")
    if wide:
        image = Image.fromarray(to_8bit(np.asarray(image), image.mode), "L")
    return image.convert("RGB"), turned or wide


def to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """A 16/32-bit integer or float grey image's values -> uint8: the top 8 bits of the depth its values use
    (an "I" image may hold 8-, 16- or 32-bit data), floats clipped to 0-255."""
    if mode == "F":
        return values.clip(0, 255).astype(np.uint8)
    peak = int(values.max()) if values.size else 0
    shift = 0 if mode not in SIXTEEN_BIT and peak < 2**8 else 8 if peak < 2**16 else 24
    return (values.astype(np.int64) >> shift).clip(0, 255).astype(np.uint8)
