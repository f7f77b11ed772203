"""Validation: edits of the configured validation pairs, as grids (reference | target | result).

Two entry points share the one inference path: `validate_pairs` (the `validate --config` command:
fresh encoding at `validation_resolution`) and `validate_cached` (inside training: the cached conditioning
of each pair at its bucket size, so the trained model is judged on exactly what it trains on).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from longcat_ray.buckets import fit_to_bucket
from longcat_ray.config import Config
from longcat_ray.inference import EditRequest, Editor, decode_image, denoise
from longcat_ray.model.latents import decode_latents, tensor_to_images
from longcat_ray.pairs import decode_image as read_image_file
from longcat_ray.pairs import discover_pairs, evaluation_rows, read_caption
from longcat_ray.storage import filesystem, join, write_bytes_atomic


@dataclass(kw_only=True)
class ValidationPair:
    sample_id: str
    reference: Image.Image
    target: Image.Image
    instruction: str


def make_grid(rows: list[list[Image.Image]], height: int = 256) -> Image.Image:
    """Rows of images -> one image; every tile scaled to `height` (aspect kept), rows left-aligned."""
    scaled = [[im.resize((max(1, round(im.width * height / im.height)), height)) for im in row] for row in rows]
    width = max(sum(im.width for im in row) for row in scaled)
    grid = Image.new("RGB", (width, height * len(scaled)), "white")
    for r, row in enumerate(scaled):
        x = 0
        for image in row:
            grid.paste(image, (x, r * height))
            x += image.width
    return grid


def save_png(image: Image.Image, url: str, options: dict[str, Any] | None = None) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    fs, path = filesystem(url, options or {})
    write_bytes_atomic(fs, path, buffer.getvalue())
    return url


def validation_pairs(config: Config, count: int) -> list[ValidationPair]:
    """The first `count` pairs (by id) of the configured edit datasets (or of `eval_dataset_id`), each with its
    linked reference."""
    rows, problems = discover_pairs(config)
    if not rows:
        linked = {d.id: d.conditioning_data for d in config.data.edit_datasets()}
        raise ValueError(f"no validation pairs: no edit image has a reference with the same file name (edit datasets -> "
                         f"references: {linked}); {len(problems)} problem(s), first: {problems[:1]}")
    options = {d.id: d.storage_options for d in config.data.datasets}
    pairs = []
    for row in evaluation_rows(rows, config)[:count]:
        reference, _, bad = read_image_file(row["ref_url"], options[row["ref_dataset_id"]], 0)
        target, _, bad_target = read_image_file(row["edit_url"], options[row["dataset_id"]], 0)
        caption, bad_caption = read_caption(row, options[row["caption_dataset_id"]])
        if bad or bad_target or bad_caption:
            raise ValueError(f"validation pair {row['sample_id']}: {(bad + bad_target + bad_caption)[0]}")
        pairs.append(ValidationPair(sample_id=row["sample_id"], reference=reference, target=target, instruction=caption))
    return pairs


def validate_pairs(config: Config, editor: Editor, out_dir: str, count: int = 4) -> list[str]:
    """`validate --config`: one grid per pair and validation resolution under out_dir."""
    val = config.validation
    written = []
    for pair in validation_pairs(config, count):
        for width, height in val.resolution:
            request = EditRequest(prompt=pair.instruction, width=width, height=height, steps=val.num_inference_steps,
                                  guidance=val.guidance, seed=val.seed, negative_prompt=val.negative_prompt)
            result = editor.edit(pair.reference, request)
            grid = make_grid([[fit_to_bucket(pair.reference, width, height), fit_to_bucket(pair.target, width, height), result]])
            name = f"{pair.sample_id.replace('/', '__')}-{width}x{height}.png"
            written.append(save_png(grid, join(out_dir, name)))
    return written


@torch.no_grad()
def validate_cached(transformer, vae, samples: list[dict[str, torch.Tensor]], config: Config) -> Image.Image:
    """In-training validation from cached conditioning: rows of (reference | target | result) decoded by the VAE.

    samples: per pair {"edit", "ref": latents [16, h/8, w/8], "text", "blank": embeddings [L, d]}. Every rank
    may call this (ZeRO-3 needs all ranks in each forward); only the returned grid matters on rank 0.
    """
    from longcat_ray.model.latents import pack_latents

    val, rows = config.validation, []
    for sample in samples:
        _, h8, w8 = sample["ref"].shape
        width, height = w8 * 8, h8 * 8
        request = EditRequest(prompt="", width=width, height=height, steps=val.num_inference_steps,
                              guidance=val.guidance, seed=val.seed)
        device, dtype = vae.device, next(transformer.parameters()).dtype
        ref = pack_latents(sample["ref"][None].to(device, dtype))
        negative = sample["blank"][None].to(device) if val.guidance > 1 and "blank" in sample else None
        latents = denoise(transformer, ref, sample["text"][None].to(device), negative, [request])
        decoded = tensor_to_images(decode_latents(vae, torch.stack([sample["ref"], sample["edit"]]).to(device, vae.dtype)))
        rows.append([*decoded, decode_image(vae, latents.to(vae.dtype), width, height)])
    return make_grid(rows)
