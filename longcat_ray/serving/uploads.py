"""Checking a request before it reaches the model: every problem becomes a 4xx naming the field.

Pure functions (no Ray, no FastAPI) so the rules are unit-tested on their own.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from dataclasses import dataclass

from PIL import Image

from longcat_ray.buckets import bucket_for
from longcat_ray.config import SIZE_GRID, nearest_on_grid
from longcat_ray.images import upright_rgb
from longcat_ray.inference import EditRequest
from longcat_ray.serving.config import ServeConfig

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1


@dataclass
class RequestError(ValueError):
    """A bad request: HTTP status, the form field at fault, and what to do about it."""

    status: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


HEADER_LOCK = threading.Lock()
"""The ingress decodes uploads on threads, and `warnings.catch_warnings` changes the process's warning filters: one
thread at a time reads a header under them."""


def decode_upload(data: bytes, config: ServeConfig) -> Image.Image:
    """Upload bytes -> RGB image. The pixel count is read from the header before anything is decoded."""
    if not data:
        raise RequestError(422, "image", "the upload is empty")
    if len(data) > config.max_upload_bytes:
        raise RequestError(413, "image", f"{len(data)} bytes is over the limit of {config.max_upload_bytes}")
    try:
        with HEADER_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # the header only; the pixels are decoded by load() below
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise RequestError(413, "image", f"too many pixels to decode safely ({err})") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for non-images
        raise RequestError(422, "image", f"not a readable image (PNG, JPEG, WebP, ...): {type(err).__name__}") from None
    pixels = image.width * image.height
    if pixels > config.max_input_pixels:
        raise RequestError(413, "image", f"{image.width}x{image.height} = {pixels} pixels is over the limit of "
                                         f"{config.max_input_pixels}")
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - truncated or corrupt data
        raise RequestError(422, "image", f"the image data is damaged or truncated: {err}") from None
    return upright_rgb(image)[0]  # as training decoded its references (longcat_ray/images.py)


OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
"""`output_format` -> (PIL's format, the response's media type)."""


@dataclass(frozen=True)
class Encoding:
    """How the replica encodes a result: `format` a key of OUTPUT_FORMATS, `quality` JPEG's/WebP's 0-100."""

    format: str = "png"
    quality: int = 90


def output_encoding(output_format: str | None, output_compression: int | None, status: int = 422) -> Encoding:
    """The form's `output_format` (default png) and `output_compression` (JPEG/WebP quality, default 90) -> Encoding;
    a format not offered is `status` (OpenAI's route answers 400) naming the field."""
    chosen = output_format or "png"
    if chosen not in OUTPUT_FORMATS:
        raise RequestError(status, "output_format", f"{output_format!r}: one of {sorted(OUTPUT_FORMATS)}")
    if output_compression is None:
        return Encoding(chosen)
    check_range("output_compression", output_compression, 0, 100)
    return Encoding(chosen, output_compression)


def encode_image(image: Image.Image, encoding: Encoding) -> bytes:
    """A result image -> its bytes, encoded once where it was made (PNG at zlib level 1: level 6 costs ~0.1 s more
    at 768² for ~10% fewer bytes)."""
    buffer = io.BytesIO()
    pil_format = OUTPUT_FORMATS[encoding.format][0]
    options = {"compress_level": 1} if pil_format == "PNG" else {"quality": encoding.quality}
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high) or math.isnan(value):
        raise RequestError(422, field, f"{value} is out of range [{low}, {high}]")


def check_request_id(request_id: str) -> str:
    """A client's id for GET /v1/progress/{id}: 1-64 ASCII letters, digits, '-' or '_'."""
    if not (0 < len(request_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in request_id)):
        raise RequestError(422, "request_id", "1-64 letters, digits, '-' or '_' (e.g. a UUID)")
    return request_id


def check_side(field: str, value: int, config: ServeConfig, note: str = "") -> int:
    check_range(field, value, SIZE_GRID, config.max_side)
    if value % SIZE_GRID:
        raise RequestError(422, field, f"{value}{note} is off the {SIZE_GRID}-px grid; "
                                       f"nearest valid: {nearest_on_grid(value, SIZE_GRID)}")
    return value


def output_size(image: Image.Image, width: int | None, height: int | None, config: ServeConfig) -> tuple[int, int]:
    """The requested size, or the missing side(s) from the source's aspect ratio, on the 16-px grid."""
    if width is None and height is None:
        return bucket_for(image.width, image.height, config.default_area, grid=SIZE_GRID)
    given = {k: check_side(k, v, config) for k, v in (("width", width), ("height", height)) if v is not None}
    if "width" not in given:
        derived = nearest_on_grid(height * image.width / image.height, SIZE_GRID)
        given["width"] = check_side("width", derived, config, " (from height and the source's aspect)")
    if "height" not in given:
        derived = nearest_on_grid(width * image.height / image.width, SIZE_GRID)
        given["height"] = check_side("height", derived, config, " (from width and the source's aspect)")
    return given["width"], given["height"]


def build_request(
    image: Image.Image,
    config: ServeConfig,
    *,
    prompt: str,
    negative_prompt: str = "",
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int = 0,
) -> EditRequest:
    """Form fields -> EditRequest, or RequestError naming the first bad field."""
    if not prompt.strip():
        raise RequestError(422, "prompt", "the instruction is empty")
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise RequestError(422, field, f"{len(text)} characters is over the limit of {MAX_PROMPT_CHARS}")
    steps = config.default_steps if num_inference_steps is None else num_inference_steps
    guidance = config.default_guidance if guidance_scale is None else guidance_scale
    check_range("num_inference_steps", steps, 1, config.max_steps)
    check_range("guidance_scale", guidance, 0, config.max_guidance)
    check_range("seed", seed, 0, MAX_SEED)
    out_width, out_height = output_size(image, width, height, config)
    return EditRequest(prompt=prompt, negative_prompt=negative_prompt, width=out_width, height=out_height,
                       steps=steps, guidance=guidance, seed=seed)
