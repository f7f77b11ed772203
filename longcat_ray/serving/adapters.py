"""LoRA adapters under one root (local or s3://), named by id only: ids never leave the root."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from longcat_ray.export import LORA_FILE
from longcat_ray.serving.uploads import RequestError
from longcat_ray.storage import filesystem, is_local, join

LORA_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_lora_id(name: str) -> bool:
    """A bare name: letters, digits, `.`, `_`, `-` (no `/`, no `..`, no scheme)."""
    return bool(LORA_ID.fullmatch(name)) and ".." not in name


def check_lora_id(lora_id: str) -> str:
    """The id, or a 400 naming the `lora` field."""
    if not is_lora_id(lora_id):
        raise RequestError(400, "lora", f"{lora_id!r} is not an adapter id: ids are names under the adapter root "
                                        "(letters, digits, '.', '_', '-'); paths and URLs are refused")
    return lora_id


def candidate_names(lora_id: str) -> list[str]:
    """An exported output_dir (`<id>/pytorch_lora_weights.safetensors`) or a bare `<id>.safetensors`."""
    return [join(lora_id, LORA_FILE), f"{lora_id.removesuffix('.safetensors')}.safetensors"]


def find_lora(root: str | None, lora_id: str, options: dict[str, Any]) -> str:
    """id -> URL of its safetensors file under root; RequestError 404 if there is none."""
    check_lora_id(lora_id)
    if root:
        fs, path = filesystem(root, options)
        for name in candidate_names(lora_id):
            if fs.isfile(join(path, name)):
                return join(root, name)
    raise RequestError(404, "lora", f"no adapter {lora_id!r} under the adapter root; GET /v1/loras lists them")


def list_loras(root: str | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every adapter id under root with its file size, sorted by id."""
    if not root:
        return []
    fs, path = filesystem(root, options)
    found: dict[str, int] = {}
    for pattern, strip in ((f"{path}/*/{LORA_FILE}", f"/{LORA_FILE}"), (f"{path}/*.safetensors", ".safetensors")):
        for file in fs.glob(pattern):
            lora_id = file.removesuffix(strip).rsplit("/", 1)[-1]
            if is_lora_id(lora_id):
                found.setdefault(lora_id, int(fs.size(file)))
    return [{"id": key, "bytes": size} for key, size in sorted(found.items())]


def local_copy(url: str, options: dict[str, Any]) -> str:
    """A local path of the adapter file (remote files are downloaded to a temporary folder)."""
    fs, path = filesystem(url, options)
    if is_local(fs):
        return path
    local = os.path.join(tempfile.mkdtemp(prefix="longcat-lora-"), LORA_FILE)
    fs.get(path, local)
    return local
