"""Aspect buckets on the 64-px grid, and fitting an image into its bucket."""

from __future__ import annotations

import math

from PIL import Image


def resize_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize exactly as diffusers' VaeImageProcessor does for PIL input (Lanczos). Lives here, free of torch, so
    the pair scan's Ray tasks do not import it."""
    if image.size == (width, height):
        return image
    return image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)



def bucket_for(width: int, height: int, target_area: float, grid: int = 64) -> tuple[int, int]:
    """(width, height) of an image -> the (bucket width, bucket height) on the grid.

    Picks the grid size that best trades aspect-ratio error against area error (both on a log scale, the
    area counting half), so coarse grids at small resolutions still keep landscape images landscape.
    """
    ratio, side = width / height, math.sqrt(target_area)
    best, best_score = (grid, grid), math.inf
    for bucket_h in range(grid, int(4 * side) + grid, grid):
        for bucket_w in {max(grid, math.floor(bucket_h * ratio / grid) * grid), math.ceil(bucket_h * ratio / grid) * grid}:
            score = abs(math.log(bucket_w / bucket_h / ratio)) + 0.5 * abs(math.log(bucket_w * bucket_h / target_area))
            if score < best_score - 1e-12:
                best, best_score = (int(bucket_w), int(bucket_h)), score
    return best


def fit_to_bucket(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover width x height (Lanczos), then centre-crop: no distortion, no padding."""
    image = image.convert("RGB")
    scale = max(width / image.width, height / image.height)
    covered = resize_image(image, max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    left, top = (covered.width - width) // 2, (covered.height - height) // 2
    return covered.crop((left, top, left + width, top + height))
