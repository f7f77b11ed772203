"""Hugging Face datasets as image folders: each row is one image named by its row number (`12.png`), read through
the `datasets` library; the one module that imports it. URLs `hf-row:<dataset id>/<row>` travel in the pair rows
like file URLs; `settings` is the dataset's `DatasetConfig.hub` (name, split, revision, columns, SimpleTuner's
composite and filter blocks), carried in its storage options.
"""

from __future__ import annotations

import functools
import io
import json
import os
from typing import Any

SCHEME = "hf-row:"


def row_url(dataset_id: str, row: int) -> str:
    return f"{SCHEME}{dataset_id}/{row}"


def row_of(url: str) -> int:
    return int(url.rsplit("/", 1)[1])


def settings_key(settings: dict[str, Any]) -> str:
    return json.dumps({k: settings.get(k) for k in ("dataset_name", "split", "revision")}, sort_keys=True)


@functools.lru_cache(maxsize=8)
def open_dataset(key: str):
    """(name, split, revision) -> the `datasets.Dataset`, images left undecoded (their bytes are what is hashed).
    A folder written by `save_to_disk` is loaded from disk; anything else goes to `load_dataset` (hub or files)."""
    import datasets

    where = json.loads(key)
    name = where["dataset_name"]
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        found = datasets.load_from_disk(name)
        table = found[where["split"]] if isinstance(found, datasets.DatasetDict) else found
    else:
        table = datasets.load_dataset(name, split=where["split"], revision=where["revision"])
    return table


def dataset_for(settings: dict[str, Any]):
    """The dataset with its image column undecoded; a clear error names a missing column."""
    return undecoded(settings_key(settings), settings.get("image_column") or "image", settings["dataset_name"])


@functools.lru_cache(maxsize=8)
def undecoded(key: str, column: str, name: str):
    """Cast once per process: every image read of the cache stage goes through here."""
    import datasets

    table = open_dataset(key)
    if column not in table.column_names:
        raise KeyError(f"{name} has no image column '{column}' (columns: {table.column_names})")
    if isinstance(table.features[column], datasets.Image):
        table = table.cast_column(column, datasets.Image(decode=False))
    return table


def keep_row(item: dict[str, Any], rules: dict[str, Any]) -> bool:
    """SimpleTuner's `filter_func` block on one row (its rules and defaults: a row without the quality column, or
    below any threshold, or outside the collections, or narrower/shorter than min_width/min_height, is left out)."""
    if "collection" in rules:
        wanted = rules["collection"] if isinstance(rules["collection"], list) else [rules["collection"]]
        if item.get("collection") not in wanted:
            return False
    if "quality_thresholds" in rules:
        quality = item.get(rules.get("quality_column", "quality_assessment")) or {}
        if not quality or any((quality.get(metric) or 0) < floor for metric, floor in rules["quality_thresholds"].items()):
            return False
    return item.get("width", 0) >= rules.get("min_width", 0) and item.get("height", 0) >= rules.get("min_height", 0)


def list_rows(dataset_id: str, settings: dict[str, Any]) -> dict[str, str]:
    """-> {"<row>.png": URL} for the rows the filter keeps (row numbers of the whole split, so an edit and a reference
    dataset over the same rows pair up even if their filters differ)."""
    table = dataset_for(settings)
    rules = settings.get("filter_func") or {}
    if rules:
        columns = [c for c in ("collection", rules.get("quality_column", "quality_assessment"), "width", "height")
                   if c in table.column_names]
        meta = table.select_columns(columns)
        rows = [i for i, item in enumerate(meta) if keep_row(item, rules)]
    else:
        rows = range(len(table))
    return {f"{i}.png": row_url(dataset_id, i) for i in rows}


def lookup(item: dict[str, Any], column: str) -> Any:
    """`a.b` -> item["a"]["b"] (SimpleTuner's nested caption columns); a plain name -> item[name]."""
    value: Any = item
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@functools.lru_cache(maxsize=8)
def _captions(key: str, column: str, fallback: str | None) -> tuple[str, ...]:
    table = open_dataset(key)
    heads = sorted({c.split(".")[0] for c in (column, fallback) if c})
    missing = [h for h in heads if h not in table.column_names]
    if missing:
        raise KeyError(f"{json.loads(key)['dataset_name']} has no caption column {missing} (columns: {table.column_names})")
    texts = []
    for item in table.select_columns(heads):
        text = lookup(item, column)
        if not text and fallback:
            text = lookup(item, fallback)
        texts.append(str(text).strip() if text else "")
    return tuple(texts)


def caption(settings: dict[str, Any], row: int) -> str:
    """The row's instruction from the caption column (or its fallback); "" when both are empty."""
    column = settings["caption_column"]
    column = column[0] if isinstance(column, list) else column
    return _captions(settings_key(settings), column, settings.get("fallback_caption_column"))[row]


def read_image_bytes(url: str, settings: dict[str, Any]) -> bytes:
    """The row's image file bytes; with SimpleTuner's `composite_image_config`, its panel re-encoded as PNG
    (lossless, so the same panel always gives the same bytes and cache key)."""
    value = dataset_for(settings)[row_of(url)][settings.get("image_column") or "image"]
    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None and isinstance(value, dict) and value.get("path"):
        with open(value["path"], "rb") as file:
            data = file.read()
    if not isinstance(data, bytes):
        raise OSError(f"{url}: the image column holds no image bytes ({type(value).__name__})")
    composite = settings.get("composite_image_config") or {}
    return panel(data, int(composite.get("image_count", 1)), int(composite.get("select_index", 0))) if composite.get("enabled") else data


def panel(data: bytes, count: int, index: int) -> bytes:
    """Panel `index` of `count` side-by-side panels (SimpleTuner's crop: width // count each), as PNG bytes."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    width = image.width // count
    out = io.BytesIO()
    image.crop((index * width, 0, (index + 1) * width, image.height)).save(out, format="PNG")
    return out.getvalue()
