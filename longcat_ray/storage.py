"""Local paths and s3:// URLs through fsspec/s3fs, with SimpleTuner's aws_* dataset keys."""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def s3_options(endpoint_url: str | None = None, region: str | None = None) -> dict[str, Any]:
    """s3fs options; credentials come from the environment (AWS_ACCESS_KEY_ID, profiles, instance roles)."""
    options: dict[str, Any] = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL or path -> (filesystem, path inside it). Options apply to s3:// only (a Hugging Face dataset's settings,
    carried beside them, are not s3fs's)."""
    kwargs = {k: v for k, v in (options or {}).items() if k != "huggingface"} if url.startswith("s3://") else {}
    return url_to_fs(url, **kwargs)


def is_url(path: str) -> bool:
    """An object-store URL (`s3://...`), not a local path."""
    return "://" in path


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Whole-or-nothing write: object stores put atomically; local files go through a rename."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols
