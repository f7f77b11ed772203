"""The latent cache: a Ray Data map stage on encoder actors writing safetensors entries to local disk or S3.

Per pair: the edit's VAE latents (edit dataset's `cache_dir_vae`), the reference's VAE latents (reference
dataset's `cache_dir_vae`), the prompt embedding of (instruction, reference) and, with caption dropout,
of ("", reference) in the text cache. Each entry's name carries the sample id and a hash of the content
(image bytes, caption), the bucket and the encoder fingerprint, so a re-run re-encodes exactly what changed.
Each entry carries a checksum of its tensors; a corrupt or truncated one is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from longcat_ray.buckets import fit_to_bucket
from longcat_ray.config import Config
from longcat_ray.model.latents import encode_latents, image_to_tensor
from longcat_ray.model.prompt import encode_prompts, vl_image
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
    batch_size: int = 8


@dataclass(kw_only=True)
class CacheSummary:
    pairs: int
    encoded: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)
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
            f"({self.bytes_written / 2**20:.1f} MiB written); manifest {self.manifest}"
        )


def make_plan(config: Config) -> CachePlan:
    datasets = [d for d in config.data.datasets if d.dataset_type in ("image", "conditioning") and not d.disabled]
    options = {d.id: d.storage_options for d in datasets}
    options["text"] = config.data.text_cache_options
    return CachePlan(
        model=config.model.pretrained_model_name_or_path,
        revision=config.model.revision,
        vae_dirs={d.id: d.cache_dir_vae for d in datasets},
        text_dir=config.data.text_cache_dir,
        options=options,
        blank=config.train.caption_dropout_probability > 0,
        batch_size=config.data.cache_batch_size,
    )


# ---- model resolution and fingerprints ---------------------------------------------------------------


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local pipeline folder, or the hub snapshot of a repo id (downloaded once into the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, revision=revision))


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


def entry_urls(row: dict[str, Any], plan: CachePlan, vae_fp: str, text_fp: str) -> dict[str, str]:
    """Where each of a pair's entries lives; the name changes whenever what it encodes changes."""
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


def parse_entry(data: bytes) -> dict[str, torch.Tensor] | None:
    """Entry bytes -> tensors, or None when truncated, unparsable or failing its checksum."""
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        tensors = load_safetensors(data)
    except Exception:  # noqa: BLE001 -- any parse failure means "re-encode"
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("checksum") != tensor_checksum(tensors):
        return None
    return tensors


def load_entry(url: str, options: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, or None when missing, truncated or corrupt."""
    try:
        return parse_entry(read_bytes(url, options))
    except OSError:
        return None


def valid_entry_size(url: str, options: dict[str, Any]) -> int | None:
    """Size in bytes of a valid entry, or None when it must be (re-)encoded."""
    try:
        data = read_bytes(url, options)
    except OSError:
        return None
    return len(data) if parse_entry(data) is not None else None


# ---- the encoder actor -------------------------------------------------------------------------------


class CacheEncoder:
    """Ray Data actor: loads the VAE and the VL text encoder once, encodes what is missing in each batch."""

    def __init__(self, plan: CachePlan):
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

        self.plan = plan
        root = resolve_model_dir(plan.model, plan.revision)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype).to(self.device).eval()
        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root, subfolder="text_encoder", torch_dtype=dtype
        ).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
        self.image_processor = Qwen2VLProcessor.from_pretrained(root, subfolder="text_processor").image_processor
        self.vae_fp = fingerprint_files(root, ("vae",))
        self.text_fp = fingerprint_files(root, ("text_encoder", "tokenizer", "text_processor"))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for row in rows:
            row["urls"] = entry_urls(row, self.plan, self.vae_fp, self.text_fp)
            sizes = {k: valid_entry_size(url, entry_options(k, row, self.plan)) for k, url in row["urls"].items()}
            row["missing"] = [k for k, size in sizes.items() if size is None]
            row["reused_bytes"], row["written"] = sum(v for v in sizes.values() if v), 0
        for bucket, group in group_by_bucket([r for r in rows if r["missing"]]).items():
            for row, tensors in zip(group, self.encode_group(group, bucket)):
                row["written"] = self.store(row, tensors)
        return {
            "sample_id": np.array([r["sample_id"] for r in rows]),
            "status": np.array(["encoded" if r["missing"] else "reused" for r in rows]),
            "bytes_written": np.array([r["written"] for r in rows]),
            "cache_bytes": np.array([r["written"] + r["reused_bytes"] for r in rows]),
            "urls": np.array([json.dumps(r["urls"]) for r in rows]),
        }

    @torch.no_grad()
    def encode_group(self, rows: list[dict[str, Any]], bucket: tuple[int, int]) -> list[dict[str, dict[str, torch.Tensor]]]:
        """Encode a same-bucket group -> per row {kind: tensors} for its missing kinds."""
        width, height = bucket
        edits = [fit_to_bucket(self.image(r["edit_url"], r, "edit"), width, height) for r in rows]
        refs = [fit_to_bucket(self.image(r["ref_url"], r, "ref"), width, height) for r in rows]
        out: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in rows]
        kinds = {k for r in rows for k in r["missing"]}
        if "edit" in kinds:
            self.put(out, "edit", "latents", encode_latents(self.vae, image_to_tensor(edits)))
        if "ref" in kinds:
            self.put(out, "ref", "latents", encode_latents(self.vae, image_to_tensor(refs)))
        vls = [vl_image(ref, width, height) for ref in refs]
        encoder = (self.text_encoder, self.tokenizer, self.image_processor)
        if "text" in kinds:
            self.put(out, "text", "prompt_embeds", encode_prompts(*encoder, [r["caption"] for r in rows], vls))
        if "blank" in kinds:
            self.put(out, "blank", "prompt_embeds", encode_prompts(*encoder, [""] * len(rows), vls))
        return out

    @staticmethod
    def put(out: list[dict], kind: str, name: str, batch: torch.Tensor) -> None:
        for i, tensors in enumerate(out):
            tensors[kind] = {name: batch[i]}

    def image(self, url: str, row: dict[str, Any], kind: str):
        image, _, problems = decode_image(url, entry_options(kind, row, self.plan), 0)
        if image is None:  # changed since the dataset report
            raise RuntimeError(f"cannot read {url} while caching: {problems[0]}")
        return image

    def store(self, row: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> int:
        total = 0
        for kind in row["missing"]:
            data = serialize_entry(tensors[kind], row["sample_id"])
            fs, path = filesystem(row["urls"][kind], entry_options(kind, row, self.plan))
            write_bytes_atomic(fs, path, data)
            total += len(data)
        return total


def group_by_bucket(rows: list[dict[str, Any]]) -> dict[tuple[int, int], list[dict[str, Any]]]:
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((int(row["bucket_w"]), int(row["bucket_h"])), []).append(row)
    return groups


# ---- the driver --------------------------------------------------------------------------------------


def manifest_url(config: Config) -> str:
    """The manifest of a dataset configuration: which entries make up the cache, per sample."""
    edits = sorted((d.id, d.data_root, tuple(d.conditioning_data)) for d in config.data.edit_datasets())
    return join(config.data.text_cache_dir, f"manifest-{short_hash(edits)}.jsonl")


def encode_dataset(pairs: list[dict[str, Any]], plan: CachePlan, workers: int | None = None):
    """The Ray Data map stage: one encoder actor per GPU (or `workers` CPU actors without GPUs)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    size = workers or max(1, gpus)
    return ray.data.from_items(pairs).map_batches(
        CacheEncoder,
        fn_constructor_kwargs={"plan": plan},
        compute=ray.data.ActorPoolStrategy(size=size),
        num_gpus=1 if gpus else 0,
        batch_size=plan.batch_size,
    )


def write_manifest(url: str, options: dict[str, Any], pairs: list[dict[str, Any]], urls: dict[str, dict[str, str]]) -> None:
    keep = ("sample_id", "dataset_id", "ref_dataset_id", "bucket_w", "bucket_h", "repeats", "caption")
    lines = [json.dumps({**{k: row[k] for k in keep}, "entries": urls[row["sample_id"]]}) for row in pairs]
    fs, path = filesystem(url, options)
    write_bytes_atomic(fs, path, ("\n".join(lines) + "\n").encode())


def read_manifest(config: Config) -> list[dict[str, Any]]:
    url = manifest_url(config)
    try:
        text = read_bytes(url, config.data.text_cache_options).decode()
    except OSError:
        raise FileNotFoundError(f"no cache manifest at {url}: run `longcat-ray cache --config {config.source}` first") from None
    return [json.loads(line) for line in text.splitlines() if line]


def build_cache(config: Config, workers: int | None = None, progress: bool = True) -> CacheSummary:
    """Check the dataset, encode what is missing or changed, write the manifest. Raises DatasetError."""
    from tqdm import tqdm

    from longcat_ray.pairs import prepare_pairs

    pairs, problems = prepare_pairs(config)
    plan = make_plan(config)
    summary = CacheSummary(pairs=len(pairs), skipped=[str(p) for p in problems], manifest=manifest_url(config))
    urls: dict[str, dict[str, str]] = {}
    start = time.time()
    with tqdm(total=len(pairs), desc="caching", unit="pair", disable=not progress) as bar:
        for batch in encode_dataset(pairs, plan, workers).iter_batches(batch_size=None, batch_format="numpy"):
            for sample_id, status, url_json in zip(batch["sample_id"], batch["status"], batch["urls"]):
                urls[str(sample_id)] = json.loads(url_json)
                summary.encoded += status == "encoded"
                summary.reused += status == "reused"
            summary.bytes_written += int(batch["bytes_written"].sum())
            summary.cache_bytes += int(batch["cache_bytes"].sum())
            bar.update(len(batch["sample_id"]))
    summary.seconds = time.time() - start
    write_manifest(summary.manifest, plan.options["text"], pairs, urls)
    return summary
