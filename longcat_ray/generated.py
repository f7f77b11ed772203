"""References generated from the edit images: SimpleTuner's `conditioning` generators that make an edit reference
(`superresolution`, `jpeg_artifacts`, `canny`/`edges`), with SimpleTuner's parameters and defaults
(simpletuner/helpers/data_generation/sample_generator.py). Where SimpleTuner draws from a global random state, each
image here draws from a generator seeded by its own bytes and the settings, so a reference is the same PNG on every
read: the pair scan hashes it and the cache keys it like a file.

A generated reference's URL is `gen:<settings JSON>|<edit image URL>`; it is made where it is read (the scan and the
cache stage's Ray Data tasks).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageFilter

from longcat_ray.images import upright_rgb

SCHEME = "gen:"


def settings(spec: dict[str, Any]) -> dict[str, Any]:
    """A `conditioning` entry -> its settings: SimpleTuner reads them at the entry's top level or under `params`."""
    return {**(spec.get("params") or {}), **{k: v for k, v in spec.items() if k != "params"}}


def reference_url(spec: dict[str, Any], edit_url: str) -> str:
    return SCHEME + json.dumps(settings(spec), sort_keys=True, separators=(",", ":")) + "|" + edit_url


def parse(url: str) -> tuple[dict[str, Any], str]:
    """-> (settings, edit image URL)."""
    spec, end = json.JSONDecoder().raw_decode(url, len(SCHEME))
    return spec, url[end + 1 :]


def generate(spec: dict[str, Any], data: bytes) -> bytes:
    """The edit image's bytes -> the generated reference as PNG bytes (the same bytes on every call)."""
    image = upright_rgb(Image.open(io.BytesIO(data)))[0]  # the edit image as training sees it
    seed = hashlib.sha256(data + json.dumps(spec, sort_keys=True).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
    out = io.BytesIO()
    GENERATORS[spec["type"]](image, spec, rng).save(out, format="PNG")
    return out.getvalue()


def gaussian_noise(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """SimpleTuner's noise: N(0, level) on [0, 1] values, clipped, truncated back to 8 bits."""
    pixels = np.asarray(image).astype(np.float32) / 255.0
    noisy = np.clip(pixels + rng.normal(0, level, pixels.shape), 0, 1)
    return Image.fromarray((noisy * 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int, **options: Any) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, **options)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def superresolution(image: Image.Image, spec: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """A degraded copy at the same size: optional bilinear down/up-scale, blur, noise, optional JPEG."""
    factor, radius, blur = spec.get("downscale_factor"), spec.get("blur_radius", 2.0), spec.get("blur_type", "gaussian")
    result = image
    if factor is not None and factor > 1:
        small = (int(image.width / factor), int(image.height / factor))
        result = result.resize(small, Image.Resampling.BILINEAR).resize(image.size, Image.Resampling.BILINEAR)
    if blur == "gaussian":
        result = result.filter(ImageFilter.GaussianBlur(radius=radius))
    elif blur == "box":
        result = result.filter(ImageFilter.BoxBlur(radius=radius))
    elif blur == "both":
        result = result.filter(ImageFilter.BoxBlur(radius=radius * 0.7)).filter(ImageFilter.GaussianBlur(radius=radius * 0.7))
    if spec.get("add_noise", True) and spec.get("noise_level", 0.02) > 0:
        result = gaussian_noise(result, spec.get("noise_level", 0.02), rng)
    if spec.get("jpeg_quality") is not None:
        result = jpeg(result, spec["jpeg_quality"])
    return result


SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def jpeg_quality(spec: dict[str, Any], rng: np.random.Generator) -> int:
    """SimpleTuner's base quality: `fixed` (quality), `range` (an integer in quality_range, ends included) or `random`
    (one of quality_list)."""
    mode = spec.get("quality_mode", "fixed")
    if mode == "range":
        low, high = spec.get("quality_range", (10, 50))
        return int(rng.integers(low, high + 1))
    if mode == "random":
        return int(rng.choice(spec.get("quality_list", [10, 20, 30, 40])))
    return spec.get("quality", 25)


def jpeg_artifacts(image: Image.Image, spec: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """Optional pre-blur and noise, then `compression_rounds` JPEG rounds (round i > 0 at a fresh base quality times
    round_quality_decay^i, clamped to 1..95, as SimpleTuner draws it), then optional noise on the 8x8 block edges."""
    result = image
    if spec.get("pre_blur", False):
        result = result.filter(ImageFilter.GaussianBlur(radius=spec.get("pre_blur_radius", 0.5)))
    if spec.get("add_noise", False) and spec.get("noise_level", 0.01) > 0:
        result = gaussian_noise(result, spec.get("noise_level", 0.01), rng)
    options = {"optimize": spec.get("optimize", False), "progressive": spec.get("progressive", False)}
    if spec.get("subsampling") in SUBSAMPLING:
        options["subsampling"] = SUBSAMPLING[spec["subsampling"]]
    for round_index in range(spec.get("compression_rounds", 1)):
        quality = jpeg_quality(spec, rng)
        if round_index:
            quality = max(1, min(95, int(quality * spec.get("round_quality_decay", 0.9) ** round_index)))
        result = jpeg(result, quality, **options)
    if spec.get("enhance_blocks", False):
        result = block_noise(result, spec.get("block_noise_level", 0.02), rng)
    return result


def block_noise(image: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image).astype(np.float32) / 255.0
    edges = np.zeros(pixels.shape[:2], dtype=np.float32)  # [h, w]: rows and columns on the 8-px JPEG grid
    edges[::8, :], edges[:, ::8] = 1.0, 1.0
    noisy = np.clip(pixels + rng.normal(0, level, pixels.shape) * edges[..., None], 0, 1)
    return Image.fromarray((noisy * 255).astype(np.uint8))


def canny(image: Image.Image, spec: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """Canny edges (OpenCV) of the grey image, as RGB."""
    import cv2

    grey = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, spec.get("low_threshold", 50), spec.get("high_threshold", 100))
    return Image.fromarray(cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB))


GENERATORS: dict[str, Callable[[Image.Image, dict[str, Any], np.random.Generator], Image.Image]] = {
    "superresolution": superresolution, "jpeg_artifacts": jpeg_artifacts, "canny": canny, "edges": canny,
}
