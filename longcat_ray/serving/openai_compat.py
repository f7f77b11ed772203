"""OpenAI Images API shapes for `POST /v1/images/edits` and `GET /v1/models`, so the official `openai` client,
gateways and UIs that speak it can edit with the base model or any LoRA (`model` = adapter id).

Pure functions (no Ray, no FastAPI): what a request may ask, and the JSON that answers it. The checks of the image
and the edit parameters are /v1/edit's own (serving/uploads.py), with the same 4xx statuses; only the error body
takes OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

from longcat_ray.config import parse_resolutions
from longcat_ray.serving.uploads import MAX_SEED, RequestError

BASE_MODEL = "longcat-image-edit"
"""The `model` id of the base model (no adapter); an absent or empty `model` means it too."""
MAX_N = 4
OPENAI_PATHS = ("/v1/images/", "/v1/models")


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


PARAMS = {"lora": "model"}  # /v1/edit's field -> OpenAI's name for it (the adapter is the `model`)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an HTTP status (the client raises its matching exception from the status); a
    field named as /v1/edit names it is given OpenAI's name."""
    param = PARAMS.get(param, param)
    kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    code = "invalid_api_key" if status == 401 else "model_not_found" if status == 404 and param == "model" else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """`WxH` -> (W, H); `auto`, empty or absent -> (None, None): the size follows the source's aspect ratio."""
    if size is None or size.strip() in ("", "auto"):
        return None, None
    try:
        (width, height), = parse_resolutions(size)
    except ValueError:
        raise RequestError(422, "size", f"{size!r} is not WIDTHxHEIGHT (e.g. 768x768) or auto") from None
    return width, height


def adapter_of(model: str | None) -> str | None:
    """`model` -> the LoRA id to apply, None for the base model."""
    return None if model is None or model.strip() in ("", BASE_MODEL) else model.strip()


def check_supported(*, images: int, n: int, response_format: str | None, mask: bool, stream: bool | None,
                    background: str | None) -> None:
    """What this server cannot do is refused by name (400), never silently ignored. `quality`, `input_fidelity`,
    `user` and similar hints are accepted and have no effect; `output_format` is checked with /v1/edit's
    (uploads.output_encoding, answering 400 here)."""
    if images != 1:
        raise RequestError(400, "image", f"{images} images sent: LongCat-Image-Edit edits one source image per request")
    if mask:
        raise RequestError(400, "mask", "masks are not supported: the model edits by instruction; name the region "
                                        "in the prompt")
    if stream:
        raise RequestError(400, "stream", "streaming is not supported; leave stream unset")
    if response_format not in (None, "", "b64_json"):
        raise RequestError(400, "response_format", f"{response_format!r}: this server keeps no result store to "
                                                   "link to; use b64_json")
    if background == "transparent":
        raise RequestError(400, "background", "transparent backgrounds are not supported: the model paints every pixel")
    if not 1 <= n <= MAX_N:
        raise RequestError(422, "n", f"{n} is out of range [1, {MAX_N}]")


def seeds(seed: int | None, n: int) -> list[int]:
    """n distinct seeds: seed, seed+1, ... when given (reproducible), else random."""
    if seed is not None and not 0 <= seed <= MAX_SEED - n + 1:
        raise RequestError(422, "seed", f"{seed} is out of range [0, {MAX_SEED - n + 1}] for n={n}")
    first = secrets.randbelow(2**31) if seed is None else seed
    return [first + i for i in range(n)]


def images_response(images: list[bytes], used_seeds: list[int], width: int, height: int,
                    output_format: str) -> dict[str, Any]:
    """OpenAI's ImagesResponse; each item also carries the seed that made it (an extra field clients keep)."""
    data = [{"b64_json": base64.b64encode(image).decode("ascii"), "seed": seed} for image, seed in zip(images, used_seeds)]
    return {"created": int(time.time()), "data": data, "output_format": output_format,
            "size": f"{width}x{height}"}


def model_list(loras: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's model list: the base model, then every adapter under the adapter root."""
    ids = [BASE_MODEL, *(lora["id"] for lora in loras if "error" not in lora)]  # only what can load
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "longcat-ray"} for i in ids]}
