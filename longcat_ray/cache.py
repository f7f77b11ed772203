"""The latent cache: a Ray Data map stage on encoder actors writing safetensors entries to local disk or S3.

Per pair: the edit's VAE latents (edit dataset's `cache_dir_vae`), the reference's VAE latents (reference
dataset's `cache_dir_vae`), the prompt embedding of (instruction, reference) and, with caption dropout,
of ("", reference) in the text cache. Each entry's name carries the sample id and a hash of the content
(image bytes, caption), the bucket and the encoder fingerprint, so a re-run re-encodes exactly what changed.
Each entry carries a checksum of its tensors and the sample id it was written for; a corrupt, truncated or
misplaced one is re-encoded, and training refuses it (`require_entry`).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from longcat_ray.buckets import fit_to_bucket
from longcat_ray.config import Config
from longcat_ray.runtime import accelerator_resource, gpus_up
from longcat_ray.model.latents import encode_latents, pixels_to_tensor
from longcat_ray.model.prompt import (
    PROMPT_ENCODING,
    PromptBatch,
    PromptStates,
    encode_prompt_batch,
    expand_compact,
    prepare_vision,
    prompt_batch,
    vl_image,
)
from longcat_ray.model.vae_attention import use_wide_head_attention
from longcat_ray.model.vision import speed_up_vision
from longcat_ray.pairs import decode_image, read_bytes
from longcat_ray.storage import filesystem, join, write_bytes_atomic

CACHE_FORMAT = "longcat-ray-cache-v1"
ENTRY_KINDS = ("edit", "ref", "text", "blank")


@dataclass(kw_only=True)
class CachePlan:
    """What the encoder actors need (picklable): where each entry goes and how to encode."""

    model: str
    revision: str | None = None
    vae_dirs: dict[str, str]
    """dataset id -> cache_dir_vae (edit and reference datasets alike)."""
    text_dir: str
    options: dict[str, dict[str, Any]]
    """dataset id (and 'text') -> s3fs options."""
    blank: bool
    """Also encode the blank-instruction embedding (caption dropout is on)."""
    vae_fp: str
    text_fp: str
    batch_size: int = 8
    compile: bool | None = None
    """torch.compile the VAE encoder and the vision blocks (GPU actors only); None: when an actor has
    AUTO_COMPILE_PAIRS to encode."""
    accelerator_type: str | None = None
    """GPU model the encoder actors run on, the cache stage's and streaming's (`cache_accelerator_type`, else the
    training's); None: any GPU, or the CPU without one."""


@dataclass(kw_only=True)
class CacheSummary:
    pairs: int
    encoded: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
    files: str = ""
    """What became of every file under the datasets' folders (pairs.file_report), counted."""
    bytes_written: int = 0
    cache_bytes: int = 0
    seconds: float = 0.0
    manifest: str = ""

    @property
    def samples_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"pairs {self.pairs}, encoded {self.encoded}, reused {self.reused}, skipped {len(self.skipped)}; "
            f"{self.samples_per_second:.2f} samples/s; cache {self.cache_bytes / 2**20:.1f} MiB "
            f"({self.bytes_written / 2**20:.1f} MiB written); manifest {self.manifest}" + (f"; {self.files}" if self.files else "")
        )


def make_plan(config: Config) -> CachePlan:
    datasets = [d for d in config.data.datasets if d.dataset_type in ("image", "conditioning") and not d.disabled]
    options = {d.id: d.storage_options for d in datasets}
    options["text"] = config.data.text_cache_options
    vae_fp, text_fp = model_fingerprints(config.model.pretrained_model_name_or_path, config.model.revision)
    return CachePlan(
        vae_fp=vae_fp,
        text_fp=text_fp,
        model=config.model.pretrained_model_name_or_path,
        revision=config.model.revision,
        vae_dirs={d.id: d.cache_dir_vae for d in datasets},
        text_dir=config.data.text_cache_dir,
        options=options,
        # ("", reference) serves caption dropout and the negative prompt of in-training validation
        blank=config.train.caption_dropout_probability > 0 or (config.validation.steps > 0 and config.validation.guidance > 1),
        batch_size=config.data.cache_batch_size,
        compile=config.data.cache_compile,
        accelerator_type=config.data.cache_accelerator_type or config.train.accelerator_type,
    )


# ---- model resolution and fingerprints ---------------------------------------------------------------


CONFIG_FILES = ["model_index.json", "*/config.json", "text_processor/*", "tokenizer/*", "scheduler/*"]


def resolve_model_dir(name_or_path: str, revision: str | None = None, configs_only: bool = False) -> Path:
    """A local pipeline folder, or the hub snapshot of a repo id (downloaded once into the HF cache);
    `configs_only` fetches just the configs, tokenizer and processor files."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = CONFIG_FILES if configs_only else None
    return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))


def model_fingerprints(name_or_path: str, revision: str | None = None) -> tuple[str, str]:
    """(VAE fingerprint, text-encoder fingerprint). Local folders hash their files; a hub snapshot's folder
    name is its commit hash, which pins every file in it."""
    if Path(name_or_path).expanduser().is_dir():
        root = Path(name_or_path).expanduser()
        return fingerprint_files(root, ("vae",)), fingerprint_files(root, ("text_encoder", "tokenizer", "text_processor"))
    commit = resolve_model_dir(name_or_path, revision, configs_only=True).name
    return short_hash(name_or_path, commit, "vae"), short_hash(name_or_path, commit, "text")


def fingerprint_files(root: Path, subfolders: tuple[str, ...]) -> str:
    """Hash of every file's name, size, and first and last MiB: changes when weights or configs change,
    without reading 16 GB of text encoder on every run."""
    digest = hashlib.sha256()
    for sub in subfolders:
        for file in sorted((root / sub).rglob("*")):
            if not file.is_file():
                continue
            size = file.stat().st_size
            digest.update(f"{file.relative_to(root)}|{size}|".encode())
            with file.open("rb") as handle:
                digest.update(handle.read(2**20))
                if size > 2**21:
                    handle.seek(-(2**20), 2)
                    digest.update(handle.read())
    return digest.hexdigest()[:16]


def short_hash(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:20]


def entry_urls(row: dict[str, Any], plan: CachePlan) -> dict[str, str]:
    """Where each of a pair's entries lives; the name changes whenever what it encodes changes."""
    vae_fp, text_fp = plan.vae_fp, f"{plan.text_fp}-{PROMPT_ENCODING}"
    name = row["sample_id"].replace("/", "__")
    bucket = f"{row['bucket_w']}x{row['bucket_h']}"
    urls = {
        "edit": join(plan.vae_dirs[row["dataset_id"]], f"{name}-{short_hash('edit', row['edit_sha'], bucket, vae_fp)}.safetensors"),
        "ref": join(plan.vae_dirs[row["ref_dataset_id"]], f"{name}-{short_hash('ref', row['ref_sha'], bucket, vae_fp)}.safetensors"),
        "text": join(plan.text_dir, f"{name}-{short_hash('text', row['caption'], row['ref_sha'], bucket, text_fp)}.safetensors"),
    }
    if plan.blank:
        urls["blank"] = join(plan.text_dir, f"{name}-{short_hash('text', '', row['ref_sha'], bucket, text_fp)}.safetensors")
    return urls


def entry_options(kind: str, row: dict[str, Any], plan: CachePlan) -> dict[str, Any]:
    if kind in ("text", "blank"):
        return plan.options["text"]
    return plan.options[row["dataset_id"] if kind == "edit" else row["ref_dataset_id"]]


# ---- entries -----------------------------------------------------------------------------------------


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def serialize_entry(tensors: dict[str, torch.Tensor], sample_id: str) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": CACHE_FORMAT, "sample_id": sample_id, "checksum": tensor_checksum(tensors)}
    return save_safetensors(tensors, metadata=meta)


def parse_entry(data: bytes, sample_id: str | None = None) -> dict[str, torch.Tensor] | None:
    """Entry bytes -> tensors, or None when truncated, unparsable, failing its checksum, or (given `sample_id`)
    written for another sample."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        tensors = load_safetensors(data)
    except Exception:  # noqa: BLE001 -- any parse failure means "re-encode"
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("checksum") != tensor_checksum(tensors):
        return None
    if sample_id is not None and meta.get("sample_id") != sample_id:
        return None
    return tensors


def load_entry(url: str, options: dict[str, Any], sample_id: str | None = None) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, or None when missing, truncated, corrupt or (given `sample_id`) another sample's."""
    try:
        return parse_entry(read_bytes(url, options), sample_id)
    except OSError:
        return None


def require_entry(url: str, options: dict[str, Any], sample_id: str) -> dict[str, torch.Tensor]:
    """What training reads: `sample_id`'s entry at `url`; anything else stops the run naming the entry and the fix."""
    entry = load_entry(url, options, sample_id)
    if entry is None:
        raise RuntimeError(f"cache entry {url} (sample {sample_id}) is missing, corrupt or another sample's: re-run "
                           "`longcat-ray cache` (it re-encodes exactly those entries)")
    return entry


def valid_entry_size(url: str, options: dict[str, Any], sample_id: str) -> int | None:
    """Size in bytes of `sample_id`'s valid entry, or None when it must be (re-)encoded."""
    try:
        data = read_bytes(url, options)
    except OSError:
        return None
    return len(data) if parse_entry(data, sample_id) is not None else None


# ---- stage 1 (CPU tasks): what is missing, decode, fit, VL preprocessing ----------------------------

_PROCESSORS: dict[str, Any] = {}


def vl_processor_at(root: Path):
    from transformers import Qwen2VLProcessor

    return Qwen2VLProcessor.from_pretrained(root, subfolder="text_processor").image_processor


def vl_processor(plan: CachePlan):
    """The VL image processor (small files), loaded once per worker process."""
    if plan.model not in _PROCESSORS:
        _PROCESSORS[plan.model] = vl_processor_at(resolve_model_dir(plan.model, plan.revision, configs_only=True))
    return _PROCESSORS[plan.model]


def missing_kinds(row: dict[str, Any], plan: CachePlan) -> tuple[list[str], int]:
    """-> (entry kinds to (re-)encode, bytes of the valid ones)."""
    urls, missing, valid = json.loads(row["urls"]), [], 0
    for kind, url in urls.items():
        size = valid_entry_size(url, entry_options(kind, row, plan), row["sample_id"])
        missing += [kind] if size is None else []
        valid += size or 0
    return missing, valid


def prepare_row(row: dict[str, Any], plan: CachePlan, image_processor) -> dict[str, Any]:
    """Decode and fit both images to the bucket; the VL copy of the reference, patchified."""
    width, height = int(row["bucket_w"]), int(row["bucket_h"])
    edit = fit_to_bucket(read_image(row["edit_url"], entry_options("edit", row, plan)), width, height)
    ref = fit_to_bucket(read_image(row["ref_url"], entry_options("ref", row, plan)), width, height)
    pixel_values, grid = prepare_vision(image_processor, [vl_image(ref, width, height)])
    return {"edit_pixels": np.asarray(edit), "ref_pixels": np.asarray(ref), "vl_pixels": pixel_values.numpy(), "vl_grid": grid[0].numpy()}


def check_batch(batch: dict[str, np.ndarray], plan: CachePlan) -> dict[str, list]:
    """Stage 0: read each row's entries -> which kinds are missing or damaged, and the valid bytes."""
    rows = batch_rows(batch)
    for row in rows:
        missing, valid = missing_kinds(row, plan)
        row.update(missing=json.dumps(missing), valid_bytes=valid)
    return columns(rows)


def prepare_batch(batch: dict[str, np.ndarray], plan: CachePlan) -> dict[str, list]:
    """Stage 1: decode, fit and patchify every row (all of them miss at least one entry)."""
    rows = batch_rows(batch)
    for row in rows:
        row.update(prepare_row(row, plan, vl_processor(plan)))
    return columns(rows)


# ---- stage 2 (GPU actors): encode ------------------------------------------------------------------


@dataclass(kw_only=True)
class EncoderComponents:
    """The frozen encoders of the cache stage."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_processor: Any


def load_encoder_components(model: str, revision: str | None = None) -> EncoderComponents:
    """VAE + VL text encoder (not the DiT) from a pipeline folder or hub id, on the GPU when there is one."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = resolve_model_dir(model, revision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype).to(device).eval()
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root, subfolder="text_encoder", dtype=dtype)
    return EncoderComponents(
        vae=vae,
        text_encoder=text_encoder.to(device).eval(),
        tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer"),
        image_processor=vl_processor_at(root),
    )


# Where compiling pays for its warm-up (a cold one was not timed alone; a minute would be repaid by ~4,200 pairs
# at the ~14 ms per pair it saves: VAE 2 x 6.2, vision tower 1.9; RESULTS.md).
AUTO_COMPILE_PAIRS = 5000


def should_compile(plan: CachePlan, pairs: int, actors: int) -> bool:
    return plan.compile if plan.compile is not None else pairs / max(1, actors) >= AUTO_COMPILE_PAIRS


def speed_up_encoders(parts: EncoderComponents, compile: bool = False) -> EncoderComponents:
    """Everywhere: the vision tower's exact speed-ups (model/vision.py), whatever loaded the components.
    On a GPU: the VAE encoder's attention as two matmuls (model/vae_attention.py) and, with `compile`, the
    VAE encoder and the vision tower's blocks compiled, which fuses the norms and activations between their
    matmuls and convs (measured per part in RESULTS.md; a channels-last VAE gains nothing).

    The VAE's first graph is for the first batch's shape; the first other batch size or bucket recompiles it
    once for dynamic shapes (a 16.5 s stall in the H100 pipeline run), and those run as fast (8.75 vs 8.65 ms per
    image). Compiling it with dynamic shapes from the start ran the cache stage at 25 pairs/s instead of 39
    (RESULTS.md)."""
    speed_up_vision(parts.text_encoder)
    if parts.vae.device.type != "cuda":
        return parts
    use_wide_head_attention(parts.vae)
    if compile:
        parts.vae.encoder.compile()
        for block in parts.text_encoder.model.visual.blocks:
            block.compile(dynamic=True)
    return parts


@dataclass(kw_only=True)
class GroupInputs:
    """One bucket's rows of a batch, with what the GPU needs, built on the CPU."""

    rows: list[dict[str, Any]]
    pixels: dict[str, torch.Tensor]  # "edit"/"ref" -> uint8 [b, h, w, 3], pinned on a GPU host
    vl_pixels: torch.Tensor  # [b * patches, c * t * p * p] in the text encoder's dtype
    grid: torch.Tensor  # [b, 3]
    prompts: PromptBatch


class CacheEncoder:
    """Ray Data actor: holds the VAE and the VL text encoder; encodes every row that misses an entry.

    Ray runs two calls at once on their own threads (`encoded_rows`); a lock lets one batch at a time onto the
    GPU, so one call's CPU work (stacking and pinning pixels, tokens and positions before; compacting and
    packing entries after) runs while the other's batch is on the GPU, and GPU memory holds one batch.
    """

    def __init__(self, plan: CachePlan, factory: Callable[[], EncoderComponents] | None = None, compile: bool = False):
        self.plan = plan
        parts = speed_up_encoders(factory() if factory else load_encoder_components(plan.model, plan.revision), compile)
        self.vae, self.text_encoder = parts.vae, parts.text_encoder
        self.tokenizer, self.merge_size = parts.tokenizer, parts.image_processor.merge_size
        self.gpu = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = batch_rows(batch)
        for row in rows:
            row.update({f"{kind}_tensors": b"" for kind in ENTRY_KINDS})
        groups = [self.group_inputs(group) for group in group_by_bucket(rows).values()]
        with self.gpu:
            encoded = [self.encode(group) for group in groups]
        for group, (latents, states) in zip(groups, encoded):
            for kind, batch_latents in latents.items():
                put(group.rows, kind, [{"latents": z} for z in batch_latents])
            put(group.rows, "text", [states.compact(i) for i in range(len(group.rows))])
            if states.blank is not None:
                put(group.rows, "blank", [states.compact_blank(i) for i in range(len(group.rows))])
        for row in rows:
            for key in ("edit_pixels", "ref_pixels", "vl_pixels", "vl_grid"):
                del row[key]  # not needed downstream
        return columns(rows)

    def host_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory() if self.vae.device.type == "cuda" else tensor

    def group_inputs(self, rows: list[dict[str, Any]]) -> GroupInputs:
        grid = torch.from_numpy(np.stack([r["vl_grid"] for r in rows]))
        captions = [r["caption"] for r in rows]
        return GroupInputs(
            rows=rows,
            pixels={kind: self.host_tensor(np.stack([r[f"{kind}_pixels"] for r in rows])) for kind in ("edit", "ref")},
            # the tower's first step casts to its dtype: done here, it halves the upload
            vl_pixels=torch.from_numpy(np.concatenate([r["vl_pixels"] for r in rows])).to(self.text_encoder.dtype),
            grid=grid,
            prompts=prompt_batch(self.tokenizer, captions, grid, self.merge_size, self.text_encoder.config.image_token_id,
                                 self.plan.blank),
        )

    @torch.no_grad()
    def encode(self, group: GroupInputs) -> tuple[dict[str, torch.Tensor], PromptStates]:
        """-> (edit and ref latents [b, 16, h/8, w/8], the prompt states), on the CPU."""
        latents = {}
        for kind, pixels in group.pixels.items():
            pixels = pixels_to_tensor(pixels.to(self.vae.device, non_blocking=True))
            latents[kind] = encode_latents(self.vae, pixels)
        states = encode_prompt_batch(self.text_encoder, group.prompts, group.vl_pixels, group.grid)
        return {kind: z.cpu() for kind, z in latents.items()}, states.cpu()


def put(rows: list[dict[str, Any]], kind: str, entries: list[dict[str, torch.Tensor]]) -> None:
    for row, tensors in zip(rows, entries):
        row[f"{kind}_tensors"] = save_safetensors({k: v.contiguous() for k, v in tensors.items()})


def entry_tensor(kind: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """An entry's tensors -> what training consumes: latents [16, h/8, w/8] or prompt embeds [L, d]."""
    return tensors["latents"] if kind in ("edit", "ref") else expand_compact(tensors)


# ---- stage 3 (CPU tasks): write --------------------------------------------------------------------


WRITE_FAILED = "cache storage failed writing"


class CacheStorageFailed(RuntimeError):
    """An entry or the manifest could not be written: the storage stopped answering, refused, or is full."""

    def __init__(self, failure: str):
        super().__init__(
            f"{failure}. Entries written before it are whole and kept (an S3 upload lands whole or not at all; local "
            "files are renamed into place), and no manifest was written, so no training reads a half-built cache. "
            "Fix: once the storage answers again (endpoint, credentials, network, free disk space), run the same "
            "command: it encodes only what is missing.")


def write_failure(err: Exception) -> CacheStorageFailed | None:
    """A failed Ray Data run whose text carries write_batch's line -> the error to raise, else None."""
    line = next((line.strip() for line in str(err).splitlines() if WRITE_FAILED in line), None)
    return CacheStorageFailed(line[line.index(WRITE_FAILED):][:600]) if line else None


def write_batch(batch: dict[str, np.ndarray], plan: CachePlan) -> dict[str, list]:
    """Stage 3: serialise and write each row's missing entries -> per-row byte counts."""
    out = []
    for row in batch_rows(batch):
        missing, urls, written = json.loads(row["missing"]), json.loads(row["urls"]), 0
        for kind in missing:
            data = serialize_entry(load_safetensors(row[f"{kind}_tensors"]), row["sample_id"])
            fs, path = filesystem(urls[kind], entry_options(kind, row, plan))
            try:
                write_bytes_atomic(fs, path, data)
            except Exception as err:  # noqa: BLE001 - whatever the storage raised: the line the driver reports
                raise OSError(f"{WRITE_FAILED} {urls[kind]}: {type(err).__name__}: {err}") from err
            written += len(data)
        out.append(dict(sample_id=row["sample_id"], bytes_written=written, cache_bytes=written + int(row["valid_bytes"])))
    return columns(out)


def batch_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def bucket_of(row: dict[str, Any]) -> tuple[int, int]:
    return int(row["bucket_w"]), int(row["bucket_h"])


def group_by_bucket(rows: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(bucket_of(row), []).append(row)
    return groups


def read_image(url: str, options: dict[str, Any]):
    image, _, problems = decode_image(url, options, 0)
    if image is None:  # changed since the dataset report
        raise RuntimeError(f"cannot read {url} while caching: {problems[0]}")
    return image


# ---- the driver --------------------------------------------------------------------------------------


def manifest_url(config: Config) -> str:
    """The manifest of a dataset configuration: which entries make up the cache, per sample."""
    edits = sorted((d.id, d.data_root, tuple(d.conditioning_data)) for d in config.data.edit_datasets())
    return join(config.data.text_cache_dir, f"manifest-{short_hash(edits)}.jsonl")


def cpu_stage(plan: CachePlan) -> dict[str, Any]:
    return {"batch_size": plan.batch_size, "fn_kwargs": {"plan": plan}, "num_cpus": 1}


def check_entries(pairs: list[dict[str, Any]], plan: CachePlan) -> list[dict[str, Any]]:
    """Stage 0 over every pair (Ray Data tasks): rows with their entry URLs, missing kinds and valid bytes."""
    import ray

    rows = [{**row, "urls": json.dumps(entry_urls(row, plan))} for row in pairs]
    return ray.data.from_items(rows).map_batches(check_batch, **cpu_stage(plan)).take_all() if rows else []


def encode_dataset(rows: list[dict[str, Any]], plan: CachePlan, workers: int | None = None, factory=None):
    """Stages 1-3 over the rows that miss entries: CPU tasks prepare, encoder actors (one GPU each) encode,
    CPU tasks write."""
    import ray

    accelerator = plan.accelerator_type
    gpus = gpus_up(accelerator)
    if accelerator and not gpus:
        print(f"ray: no {accelerator} GPU is up: {workers or 1} encoder actor(s) wait for the cluster's autoscaler to "
              "start one (`ray status` shows it launching)", file=sys.stderr, flush=True)
    encoded = encoded_rows(rows, plan, workers or max(1, gpus), 1 if gpus or accelerator else 0, factory)
    return encoded.map_batches(write_batch, **cpu_stage(plan))


def encoded_rows(rows: list[dict[str, Any]], plan: CachePlan, actors: int, gpus_per_actor: float, factory=None):
    """Stages 1-2, shared by the cache and the stream: CPU tasks prepare, `actors` CacheEncoders encode (on GPUs of
    the plan's `accelerator_type` when they have GPUs). The rows come out with a safetensors blob per entry kind
    (`<kind>_tensors`), in order when the context keeps it."""
    import ray

    # one block per batch: the encoders get full batches, not a full one and a remainder per block
    blocks = max(1, -(-len(rows) // plan.batch_size))
    prepared = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(prepare_batch, **cpu_stage(plan))
    actor = encoder_actor_resources(gpus_per_actor)
    # Distinct resource asks keep Ray Data from fusing the CPU stages into the encoder actor, so decoding and
    # writing run on every CPU of the cluster while the GPUs encode.
    return prepared.map_batches(
        CacheEncoder,
        fn_constructor_kwargs={"plan": plan, "factory": factory, "compile": should_compile(plan, len(rows), actors)},
        # two calls at once per actor, on two threads: one's CPU work runs while the other's batch is on the GPU
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
        num_gpus=actor["GPU"],
        num_cpus=actor["CPU"],
        **({"resources": accelerator_resource(plan.accelerator_type)} if gpus_per_actor and plan.accelerator_type else {}),
        batch_size=plan.batch_size,
    )


def encoder_actor_resources(gpus_per_actor: float) -> dict[str, float]:
    """What one CacheEncoder actor holds (training.check_cluster_fits plans the streaming readers' actors with it)."""
    return {"CPU": 1 if gpus_per_actor else 0.5, "GPU": gpus_per_actor}


MANIFEST_KEYS = ("sample_id", "group", "dataset_id", "ref_dataset_id", "bucket_w", "bucket_h", "repeats", "caption")
STREAM_KEYS = MANIFEST_KEYS + ("edit_url", "ref_url", "edit_sha", "ref_sha")


def manifest_rows(pairs: list[dict[str, Any]], plan: CachePlan, keys: tuple[str, ...] = MANIFEST_KEYS) -> list[dict[str, Any]]:
    """What training reads per sample: its bucket, repeats, caption and the URLs of its entries."""
    return [{**{k: row[k] for k in keys}, "entries": entry_urls(row, plan)} for row in pairs]


def write_manifest(url: str, options: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    fs, path = filesystem(url, options)
    write_bytes_atomic(fs, path, ("\n".join(json.dumps(row) for row in rows) + "\n").encode())


def read_manifest(config: Config) -> list[dict[str, Any]]:
    url = manifest_url(config)
    try:
        text = read_bytes(url, config.data.text_cache_options).decode()
    except OSError:
        raise FileNotFoundError(f"no cache manifest at {url}: run `longcat-ray cache --config {config.source}` first") from None
    return [json.loads(line) for line in text.splitlines() if line]


def build_cache(config: Config, workers: int | None = None, progress: bool = True) -> CacheSummary:
    """Check the dataset, encode what is missing or changed, write the manifest. Raises DatasetError."""
    from longcat_ray.pairs import count_fates, prepare_pairs

    pairs, problems, fates = prepare_pairs(config)
    plan = make_plan(config)
    summary = cache_pairs(pairs, plan, workers or config.data.cache_workers, progress)
    summary.skipped, summary.manifest = [str(p) for p in problems], manifest_url(config)
    summary.files = count_fates(fates)
    try:
        write_manifest(summary.manifest, plan.options["text"], manifest_rows(pairs, plan))
    except Exception as err:  # noqa: BLE001 - whatever the storage raised
        raise CacheStorageFailed(f"{WRITE_FAILED} {summary.manifest}: {type(err).__name__}: {err}") from None
    return summary


def cache_pairs(pairs: list[dict[str, Any]], plan: CachePlan, workers: int | None = None, progress: bool = True) -> CacheSummary:
    """Encode the entries of `pairs` that are missing or damaged (no manifest)."""
    from tqdm import tqdm

    summary, start = CacheSummary(pairs=len(pairs)), time.time()
    checked = check_entries(pairs, plan)
    # by bucket: a batch of one bucket is one encoder call (mixed ones split into smaller calls)
    todo = sorted((row for row in checked if json.loads(row["missing"])), key=bucket_of)
    summary.reused, summary.encoded = len(checked) - len(todo), len(todo)
    summary.cache_bytes = sum(int(row["valid_bytes"]) for row in checked if not json.loads(row["missing"]))
    with tqdm(total=len(todo), desc="encoding", unit="pair", disable=not progress or not todo) as bar:
        try:
            for batch in encode_dataset(todo, plan, workers).iter_batches(batch_size=None) if todo else []:
                summary.bytes_written += int(sum(batch["bytes_written"]))
                summary.cache_bytes += int(sum(batch["cache_bytes"]))
                bar.update(len(batch["sample_id"]))
        except Exception as err:
            failure = write_failure(err)
            if failure is None:
                raise
            raise failure from None  # one message instead of Ray Data's traceback of the task
    summary.seconds = time.time() - start
    return summary
