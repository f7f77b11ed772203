"""LoRA adapters under one root (local or s3://), named by id only: ids never leave the root."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from longcat_ray.lora_files import LORA_FILE, PEFT_CONFIG, PEFT_WEIGHTS, describe
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
    """An exported output_dir (`<id>/pytorch_lora_weights.safetensors`), a PEFT folder (`<id>/adapter_model.safetensors`
    + adapter_config.json: the official trainer's checkpoints) or a bare `<id>.safetensors` (any layout
    longcat_ray/lora_files.py reads)."""
    return [join(lora_id, LORA_FILE), join(lora_id, PEFT_WEIGHTS), f"{lora_id.removesuffix('.safetensors')}.safetensors"]


def find_lora(root: str | None, lora_id: str, options: dict[str, Any]) -> tuple[str, str]:
    """id -> (URL of its safetensors file under root, its version: `file_version`);
    RequestError 404 if there is none. A file replaced under the same id is a new version, loaded afresh."""
    check_lora_id(lora_id)
    if root:
        fs, path = filesystem(root, options)
        for name in candidate_names(lora_id):
            try:
                info = fs.info(join(path, name))
            except OSError:  # not there (FileNotFoundError) or unreadable: the next layout
                continue
            if info.get("type") == "file":
                if not inside_root(fs, path, join(path, name)):
                    raise RequestError(403, "lora", f"adapter {lora_id!r} is a link that leads out of the adapter root: "
                                                    "not served. Fix: copy the file into the root")
                return join(root, name), file_version(info)
    raise RequestError(404, "lora", f"no adapter {lora_id!r} under the adapter root; GET /v1/loras lists them")


def inside_root(fs, root: str, path: str) -> bool:
    """Whether `path` under `root` stays inside it once symbolic links are followed (object stores have none)."""
    if not is_local(fs):
        return True
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root.rstrip(os.sep) + os.sep)


def file_version(info: dict[str, Any]) -> str:
    """What changes when a file is replaced, from fsspec's info: local mtime and inode, S3's ETag and
    LastModified, and the size."""
    stamp = info.get("mtime") or info.get("LastModified") or ""
    return f"{stamp}|{info.get('ino', '')}|{info.get('ETag') or info.get('etag') or ''}|{info.get('size')}"


def list_loras(root: str | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every adapter id under root, sorted: its file size and layout, or the reason it cannot load ("error")."""
    if not root:
        return []
    fs, path = filesystem(root, options)
    found: dict[str, str] = {}
    for name in (LORA_FILE, PEFT_WEIGHTS):
        for file in fs.glob(f"{path}/*/{name}"):
            found.setdefault(file.removesuffix(f"/{name}").rsplit("/", 1)[-1], file)
    for file in fs.glob(f"{path}/*.safetensors"):
        found.setdefault(file.removesuffix(".safetensors").rsplit("/", 1)[-1], file)
    return [{"id": lora_id, "bytes": int(fs.size(file)), **describe(fs, file)} if inside_root(fs, path, file)
            else {"id": lora_id, "error": "a link that leads out of the adapter root: not served"}
            for lora_id, file in sorted(found.items()) if is_lora_id(lora_id)]


def local_copy(url: str, options: dict[str, Any]) -> str:
    """A local path of the adapter file (remote files are downloaded to a temporary folder)."""
    fs, path = filesystem(url, options)
    if is_local(fs):
        return path
    folder = tempfile.mkdtemp(prefix="longcat-lora-")
    local = os.path.join(folder, path.rsplit("/", 1)[-1])
    fs.get(path, local)
    config = path.rsplit("/", 1)[0] + "/" + PEFT_CONFIG
    if local.endswith(PEFT_WEIGHTS) and fs.isfile(config):  # a PEFT folder's rank and alpha
        fs.get(config, os.path.join(folder, PEFT_CONFIG))
    return local
