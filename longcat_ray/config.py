"""The one typed config tree, loaded from SimpleTuner's `config.json` + the data-backend JSON it names.

SimpleTuner keeps a flat key space (`"--learning_rate": "1e-4"`, with or without the dashes, values
often strings); `FLAT_KEYS` maps each flat key onto this tree in one place. Every problem found while
loading is collected and reported together, each naming the file, the key and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from longcat_ray.generated import GENERATORS

GRID = 64  # aspect buckets live on a 64-px grid (the seed: "keep aspect_bucket_alignment at 64")
SIZE_GRID = 16  # inference sizes: 8x VAE x 2x2 packing
OFFICIAL_LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
PRECISION_SYNONYMS = {"int8-quanto": "int8-torchao", "fp8-quanto": "fp8-torchao", "bf16": "no_change"}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")


class Section(BaseModel):
    """Base of every section: strict about unknown fields, lax about SimpleTuner's stringly values."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


EDIT_HUB_ID = "meituan-longcat/LongCat-Image-Edit"


class ModelConfig(Section):
    model_type: Literal["lora"] = "lora"
    """Only LoRA training is offered (SimpleTuner's `model_type`)."""
    model_family: Literal["longcat_image"] = "longcat_image"
    """The model family; longcat-ray trains LongCat-Image."""
    model_flavour: str = "edit"
    """`edit` (LongCat-Image-Edit). `final`/`dev` are the text-to-image flavours, not trained here."""
    pretrained_model_name_or_path: str = EDIT_HUB_ID
    """A local diffusers pipeline directory or a hub id; null takes the edit flavour's hub id, as SimpleTuner does."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when loading by hub id."""
    @field_validator("pretrained_model_name_or_path", mode="before")
    @classmethod
    def _flavour_default(cls, value: Any) -> Any:
        return EDIT_HUB_ID if value is None else value

    base_model_precision: Literal["no_change", "fp8-matmul", "int8-torchao", "fp8-torchao"] = "no_change"
    """Frozen base weights: bf16 (`no_change`); `fp8-matmul`: stored in fp8 and multiplied on the fp8 tensor
    cores (Hopper/Ada GPUs; half the weight memory, faster matmuls, activations scaled per tensor); or
    weight-only int8/fp8 through torchao (least memory, slower than bf16: they dequantise every matmul)."""


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    """LoRA rank (`lora_rank`)."""
    alpha: float | None = Field(None, gt=0)
    """LoRA alpha (`lora_alpha`); the scale is alpha / rank. Defaults to the rank (scale 1)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout (`lora_dropout`)."""
    target_modules: list[str] = Field(default_factory=lambda: list(OFFICIAL_LORA_TARGETS))
    """Module name suffixes that get adapters; the official LongCat trainer's list by default. SimpleTuner's
    `peft_lora_target_modules` sets it too: a JSON array, or the path of a JSON file holding one."""
    format: Literal["diffusers", "comfyui"] = "diffusers"
    """`lora_format` (SimpleTuner's key): `comfyui` also exports output_dir/pytorch_lora_weights_comfyui.safetensors
    (`diffusion_model.*` keys, lora_A/lora_B, an `.alpha` per module, as SimpleTuner writes it) beside the diffusers file and PEFT folder."""

    @field_validator("target_modules", mode="before")
    @classmethod
    def _json_array_or_file(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)
        try:
            return json.loads(Path(value).read_text())
        except OSError as err:
            raise ValueError(f"not a JSON array, and no JSON file can be read there ({err.strerror})") from err

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


class TrainConfig(Section):
    output_dir: str = "output/models"
    """Where checkpoints, the exported LoRA and logs go: a local path or s3://."""
    seed: int = 42
    """Seed for LoRA init, data order, noise and sigmas."""
    train_batch_size: int = Field(1, ge=1)
    """Micro-batch per worker (one aspect bucket per batch)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_checkpointing: bool = True
    """Recompute activations in the backward instead of keeping them (less memory, slower). With `compile` (on by
    default on a GPU) the compiler picks what to recompute (`activation_memory_budget`); without it, whole blocks."""
    gradient_checkpointing_interval: int | None = Field(None, ge=1)
    """Checkpoint only every N-th double and single block (SimpleTuner's key): the others keep their
    activations, trading memory for less recomputation. Null or 1: every block."""
    activation_memory_budget: float | None = Field(None, ge=0, le=1)
    """Selective recomputation chosen by the compiler (needs `compile`): the share of the compiled blocks' activations
    kept for the backward, 0 <= x <= 1 (torch's `activation_memory_budget`: its partitioner recomputes the cheapest
    operations, by FLOPs, until the rest fits; 0 recomputes the whole block, 1 keeps what an uncheckpointed compiled
    block keeps). It replaces whole-block checkpointing in the compiled blocks. Null: 0 when compile and
    `gradient_checkpointing` are on without an interval, else off. On an H200 (fp8 base, 768², same machine):
    0 -> 0.277 s/sample at 8.2 GiB, 0.1 -> 0.275 s at 9.2 GiB (0 -> 0.248 s since DeepSpeed's timer no longer
    synchronizes); other machines: none -> 0.223 s at 20.2 GiB, 0.5 ->
    0.239 s at 15.9 GiB (measured before the int8 modulation weights, which took 1.2-1.5 GiB off the other rows)
    (benchmarks/RESULTS.md)."""
    compile: bool | None = None
    """Regional torch.compile of the DiT's repeated blocks in each training worker (exact maths; a warm-up
    before the first step). Null: on when the worker has a GPU, off on CPU."""
    compile_dynamic: bool | None = None
    """How the compiled blocks meet a new batch shape (a bucket, and a batch length; torch.compile's `dynamic`).
    False: one compile per shape, each for its exact sizes (a compile warm-up per shape, the first time it comes; up
    to 64 shapes). True: symbolic sizes from the first compile (a later shape that breaks a guard the first set, e.g.
    square then not, still compiles once more). Null: False when the run has at most 4 batch shapes, else torch's
    default (the first shape exact and, when a second arrives, one recompile with symbolic sizes that then serves
    every shape). On an H100 with two buckets (fp8 base, one call): static 0.206 s/sample with a 155 s warm-up,
    torch's default 0.231 s with 184 s; each further static shape costs its own compile (benchmarks/RESULTS.md)."""
    compile_wrapper: Literal["python", "cpp"] = "python"
    """The code around the compiled blocks' kernels: `cpp` is inductor's C++ wrapper (set process-wide, which avoids
    pytorch#178845). On an H200 it ran at the Python wrapper's speed (0.2098 s/sample both) with a cold compile of
    ~155 s instead of ~70 s (benchmarks/RESULTS.md), so `python` stays the default."""
    cuda_graphs: bool | None = None
    """Replay each compiled block's forward and backward as CUDA graphs (torch.compile's `reduce-overhead`, one
    graph tree per worker, a new generation each micro-step, the LoRA's gradients kept outside the graphs' memory;
    validation runs the blocks eagerly): the host launches one graph per block instead of its ~150 kernels, so the
    step is bound by the GPU. Each bucket shape records its own graphs on its first steps. Null: on wherever compile
    is (a GPU) unless `offload_activations` is on, off on CPU. On an H200 (fp8 base, 768², same machine): 0.1979
    s/sample against 0.2015, +0.16 GiB (benchmarks/RESULTS.md)."""
    profile_steps: tuple[int, int] | None = None
    """`[first, last]`: rank 0 runs torch.profiler over these optimizer steps and writes the summary tables to
    output_dir/logs/profile-rank0.txt (where each millisecond of a step goes, host and device)."""
    fuse_qkv: bool = True
    """Each attention's q/k/v (image and text streams) as one matmul in the training forward and backward: the
    fp8-matmul base's three weights quantised with one scale, the LoRAs' down-projections concatenated (their
    parameters and the exported files are unchanged). Applies with `base_model_precision: fp8-matmul` and LoRA
    dropout 0; otherwise each projection runs alone. False: each alone, for comparison."""
    attention: Literal["auto", "cudnn", "sdpa"] = "auto"
    """Attention kernel of the training forward/backward: `cudnn` (fastest on H100/H200), `sdpa` (torch's
    choice: FlashAttention-2 on GPUs), `auto` (cudnn on Hopper or newer GPUs, else sdpa)."""
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: str = "constant"
    """One of constant, constant_with_warmup, cosine, cosine_with_restarts, linear, polynomial."""
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: str = "adamw"
    """AdamW in every spelling SimpleTuner uses (adamw, adamw_bf16, adamw_torch, optimi-adamw)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = 1e-8
    max_grad_norm: float = Field(1.0, ge=0)
    max_train_steps: int = Field(1000, ge=1)
    num_train_epochs: int = Field(0, ge=0)
    """Ignored when max_train_steps is set (SimpleTuner's rule)."""
    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(None, ge=1)
    resume_from_checkpoint: str | None = "latest"
    """`latest`, a checkpoint path, or null to start fresh."""
    caption_dropout_probability: float = Field(0.0, ge=0, le=1)
    """Share of samples whose instruction is blanked (the reference is kept, as the official trainer)."""
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """Compute dtype of the trained model: bf16, or `no` for float32 (CPU tests)."""
    zero_stage: Literal[1, 2, 3] = 1
    """DeepSpeed ZeRO stage. 1 (default) partitions the optimizer state; 2 also the gradients, through a Python
    hook on every LoRA tensor during the backward (host time that, on one H200, the step waits for; the rank-32
    LoRA's gradients are 94 MB in bf16, so 2 saves little memory); 3 also the frozen base (no quantized base)."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """`cpu`: the LoRA's fp32 master weights and AdamW moments live in (pinned) host memory and torch's AdamW steps
    them there (DeepSpeed's ZeRO-Offload); each step copies the gradients down and the new weights up. Takes 12 bytes
    per LoRA parameter off each GPU (0.53 GiB at rank 32) for host time per step; DeepSpeed clips (it computes the
    norm on the host), on the OFFLOAD_CPUS (8) CPUs each GPU worker then asks Ray for. For the smallest cards, with a
    quantized base and checkpointing. On an H200 (fp8 base, budget 0, 768²): 7.85 GiB peak at 0.40 s/sample, against
    8.20 GiB at 0.25 s without it (benchmarks/RESULTS.md)."""
    offload_activations: Literal["none", "cpu"] = "none"
    """`cpu`: what the forward keeps for the backward goes to pinned host memory as it is saved (on a side stream,
    while the next block computes) and comes back when the backward needs it: the same values, so the same maths.
    With `gradient_checkpointing` under compile that is each block's inputs (~0.9 GiB at 768², computed). The
    model's weights never move. CUDA
    graphs hold their outputs in their own memory pool, so this turns `cuda_graphs` off. For the smallest cards: on
    an H200 (fp8 base, budget 0, 768², same machine) 7.97 GiB peak at 0.274 s/sample against 8.20 GiB at 0.253 s
    (benchmarks/RESULTS.md)."""
    num_workers: int | None = Field(None, ge=1)
    """Training workers (one per GPU); default: every GPU of the cluster, or 2 CPU workers without GPUs."""
    accelerator_type: str | None = None
    """GPU model the training workers must run on, as Ray names it (`H100`, `A100-80G`, `L40S`: a node's
    `accelerator_type:<name>` resource, detected on GPU nodes and inferred by Ray's AWS autoscaler from the instance
    type). Pins training to that node type on a cluster with several, and lets it ask an autoscaler for GPUs none of
    which is up yet (then `num_workers` says how many). Null: whatever GPUs are up (CPU workers without any)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Where Ray puts the workers: PACK fills a node first (NVLink inside a host); SPREAD/STRICT_SPREAD put
    them on different nodes."""
    max_failures: int = Field(3, ge=0)
    """Worker failures Ray Train recovers from (restarting from the last checkpoint) before giving up."""
    stall_timeout_s: float = Field(900, gt=0)
    """A worker that has waited this long for its next batch stops with an error naming what its data reader waits
    on (tasks pending for resources the cluster lacks, ...) instead of waiting forever. Only time spent waiting for
    data counts: compile warm-up and slow steps do not."""

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler; use one of {', '.join(LR_SCHEDULERS)}")
        return value

    @field_validator("profile_steps")
    @classmethod
    def _step_range(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError("profile_steps is [first, last] with 1 <= first <= last, e.g. [20, 21]")
        return value

    @field_validator("optimizer")
    @classmethod
    def _adamw_only(cls, value: str) -> str:
        if "adamw" not in value.lower():
            raise ValueError("only AdamW is supported (torch AdamW inside the DeepSpeed engine); use \"adamw\"")
        return value


class ValidationConfig(Section):
    dataset_id: str | None = None
    """`eval_dataset_id` (SimpleTuner's key): the edit dataset whose pairs validation edits; null: the first pairs
    (by id) of every edit dataset."""
    resolution: list[tuple[int, int]] = Field(default_factory=lambda: [(768, 768)])
    """`validation_resolution`: `768x768`, `1024`, or a comma-separated list; each on the 16-px grid."""
    guidance: float = Field(4.5, ge=1.0)
    num_inference_steps: int = Field(40, ge=1, le=1000)
    steps: int = Field(0, ge=0)
    """`validation_steps`: validate every N training steps (0: never during training)."""
    seed: int = 42
    negative_prompt: str = ""
    """The negative prompt, encoded with the same reference (in-training validation uses the cached "")."""
    num_pairs: int = Field(4, ge=1)
    """`validation_num_pairs`: how many pairs (first by id) validation edits."""

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        return parse_resolutions(value) if isinstance(value, (str, int)) else value


class DatasetConfig(BaseModel):
    """One entry of multidatabackend.json (SimpleTuner's keys)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    id: str
    type: Literal["local", "aws", "huggingface"] = "local"
    """Where the images are: a local folder, S3, or a Hugging Face dataset (hub id or a local copy: `dataset_name`)."""
    dataset_type: Literal["image", "conditioning", "text_embeds", "image_embeds", "conditioning_image_embeds"] = "image"
    disabled: bool = False
    default: bool = False
    instance_data_dir: str | None = None
    caption_strategy: Literal["textfile", "filename", "instanceprompt", "huggingface"] | None = None
    """Defaults to `filename` (SimpleTuner's default) for edit datasets, `huggingface` (the caption column) for
    Hugging Face edit datasets, and to none for reference datasets."""
    instance_prompt: str | None = None
    resolution: float = 1024
    resolution_type: Literal["pixel_area", "pixel", "area"] = "pixel_area"
    minimum_image_size: float | None = None
    """Edits smaller than this are left out (listed, never fatal), in `resolution_type`'s unit as SimpleTuner reads
    it: `pixel` both edges, `pixel_area` the area of a minimum x minimum square, `area` megapixels. References are
    exempt."""
    cache_dir_vae: str | None = None
    cache_dir: str | None = None
    conditioning_data: list[str] = Field(default_factory=list)
    conditioning_type: str | None = None
    """On a reference dataset: SimpleTuner's `reference_strict` is what longcat-ray does (each reference resized to
    its edit's bucket: LongCat places both on one latent grid); other values are refused."""
    source_dataset_id: str | None = None
    """On a reference dataset: the edit dataset it belongs to (SimpleTuner's link from the other side); the same as
    naming this dataset in that edit dataset's `conditioning_data`."""
    conditioning: list[dict[str, Any]] | None = None
    """On an edit dataset: SimpleTuner's references generated from its images (`superresolution`, `jpeg_artifacts`,
    `canny`/`edges`, with SimpleTuner's parameters; longcat_ray/generated.py). Each becomes a reference dataset
    `<id>_conditioning_<type>`, cached like any other; with several, each epoch trains one per edit."""
    generator: dict[str, Any] | None = None
    """Set by longcat-ray on a generated reference dataset: the `conditioning` entry it comes from."""
    repeats: int = Field(0, ge=0)
    dataset_name: str | None = None
    """Hugging Face datasets: the hub id, or the folder of a local copy (`Dataset.save_to_disk`, or files
    `datasets.load_dataset` reads). Each row is one image, named by its row number: an edit and a reference dataset
    over the same rows pair up row by row (SimpleTuner's virtual `0.png`, `1.png`, ...)."""
    split: str = "train"
    revision: str | None = None
    image_column: str = "image"
    caption_column: str | list[str] | None = None
    """The instruction's column; `a.b` reads key b of column a's dicts (SimpleTuner's nested form)."""
    fallback_caption_column: str | None = None
    """Read where the caption column is empty."""
    huggingface: dict[str, Any] = Field(default_factory=dict)
    """SimpleTuner's nested block: `caption_column`, `fallback_caption_column`, `image_column` (over the top-level
    keys), `composite_image_config` ({enabled, image_count, select_index}: the image is `image_count` side-by-side
    panels, this dataset takes panel `select_index`) and `filter_func` (`collection`, `quality_thresholds` over
    `quality_column`, `min_width`/`min_height` over the `width`/`height` columns: SimpleTuner's filter)."""
    metadata_backend: Literal["discovery", "huggingface"] | None = None
    """SimpleTuner's; nothing to choose here (longcat-ray scans the images itself)."""
    aws_bucket_name: str | None = None
    aws_data_prefix: str = ""
    aws_endpoint_url: str | None = None
    aws_region_name: str | None = None

    @field_validator("conditioning_data", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def hub(self) -> dict[str, Any]:
        """A Hugging Face dataset's settings, the nested `huggingface` block over the top-level keys."""
        keys = ("dataset_name", "split", "revision", "image_column", "caption_column", "fallback_caption_column")
        return {**{k: getattr(self, k) for k in keys}, **self.huggingface}

    @property
    def data_root(self) -> str:
        """The images' location: a local directory, s3://bucket/prefix, or hf-row:<id> (rows of a Hugging Face dataset)."""
        if self.type == "huggingface":
            return f"hf-row:{self.id}"
        if self.type == "aws":
            return f"s3://{self.aws_bucket_name}/{self.aws_data_prefix}".rstrip("/")
        return self.instance_data_dir or ""

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this dataset's images and cache dirs (endpoint, region); a Hugging Face dataset's settings."""
        from longcat_ray.storage import s3_options

        hub = {"huggingface": self.hub} if self.type == "huggingface" else {}
        return {**s3_options(self.aws_endpoint_url, self.aws_region_name), **hub}

    @property
    def target_area(self) -> float:
        """Pixel area buckets aim for: resolution^2 (pixel_area, pixel) or megapixels (area)."""
        return self.resolution * 1e6 if self.resolution_type == "area" else self.resolution**2


class DataConfig(Section):
    data_backend_config: str = "config/multidatabackend.json"
    aspect_bucket_alignment: int = GRID
    minimum_image_size: float = Field(0, ge=0)
    skip_bad_pairs: bool = False
    """Skip (and list) broken pairs instead of stopping with the dataset report."""
    cache_batch_size: int = Field(8, ge=1)
    """Pairs per encoder call in the cache stage (grouped by bucket inside). 32 ran 38.8 pairs/s per H100 at 768²;
    the benchmark process, which held more than an actor does, peaked at 42 GiB (benchmarks/RESULTS.md). The
    default 8 is meant for smaller cards (its memory was not measured)."""
    cache_workers: int | None = Field(None, ge=1)
    """Encoder actors; default one per GPU of the cluster, or one on a CPU-only cluster."""
    cache_accelerator_type: str | None = None
    """GPU model the encoder actors must run on, the cache stage's and (in streaming mode) each training worker's (as
    `accelerator_type` for training, e.g. `L40S`): one GPU each; with none of that model up, `cache_workers` actors (default 1) are asked of the autoscaler. Null: the
    training's `accelerator_type`, else any GPU up (the CPU without one)."""
    cache_compile: bool | None = None
    """torch.compile the VAE encoder and the vision tower's blocks in the cache stage's GPU actors (on an H100 at
    768²: VAE 13.9 -> 7.7 ms per image, vision tower 5.7 -> 3.9 ms per pair) after a compile warm-up. Default (null): on when an actor has at
    least 5,000 pairs to encode."""
    cache_streaming: bool = False
    """Encode while training instead of caching (datasets too large to cache): each training worker streams its
    batches through Ray Data from its own encoder actor; only the validation pairs are cached."""
    stream_encoder_gpus: float = Field(1.0, ge=0)
    """GPUs of each training worker's encoder actor in streaming mode (on a GPU cluster; fractions share a GPU)."""
    text_cache_dir: str = "cache/text/longcat"
    """The prompt-embedding cache (a `text_embeds` dataset's `cache_dir` sets it)."""
    text_cache_options: dict[str, Any] = Field(default_factory=dict)
    """s3fs options of the text cache (the `text_embeds` dataset's aws_* keys)."""
    dataset_defaults: dict[str, Any] = Field(default_factory=dict)
    """config.json's top-level `resolution` / `resolution_type`: the default of every image dataset that does not
    set its own (SimpleTuner's rule)."""
    datasets: list[DatasetConfig] = Field(default_factory=list)

    def edit_datasets(self) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.dataset_type == "image" and not d.disabled]

    def dataset(self, dataset_id: str) -> DatasetConfig:
        return next(d for d in self.datasets if d.id == dataset_id)


class Config(BaseModel):
    """The whole resolved configuration."""

    model_config = ConfigDict(extra="forbid")

    source: str = "<defaults>"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    data: DataConfig = Field(default_factory=DataConfig)


# SimpleTuner's flat key -> (section, field). Keys not here are reported as unused, never dropped silently.
FLAT_KEYS: dict[str, tuple[str, str]] = {
    **{k: ("model", k) for k in ModelConfig.model_fields},
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "lora_target_modules": ("lora", "target_modules"),
    "peft_lora_target_modules": ("lora", "target_modules"),
    "lora_format": ("lora", "format"),
    **{k: ("train", k) for k in TrainConfig.model_fields},
    "validation_resolution": ("validation", "resolution"),
    "eval_dataset_id": ("validation", "dataset_id"),
    "validation_guidance": ("validation", "guidance"),
    "validation_num_inference_steps": ("validation", "num_inference_steps"),
    "validation_steps": ("validation", "steps"),
    "validation_seed": ("validation", "seed"),
    "validation_negative_prompt": ("validation", "negative_prompt"),
    "validation_num_pairs": ("validation", "num_pairs"),
    **{k: ("data", k) for k in (
        "data_backend_config", "aspect_bucket_alignment", "minimum_image_size", "skip_bad_pairs", "cache_batch_size",
        "cache_workers", "cache_accelerator_type", "cache_compile", "cache_streaming", "stream_encoder_gpus",
    )},
}
# Datasets SimpleTuner uses as embedding caches for other models' encoders: nothing for LongCat to read.
EMBED_CACHES = ("image_embeds", "conditioning_image_embeds")
# SimpleTuner's current names for keys it also reads under the legacy names we map above.
ALIASES = {"checkpoint_step_interval": "checkpointing_steps", "validation_step_interval": "validation_steps"}
# Top-level defaults SimpleTuner applies to each dataset that does not set its own.
DATASET_DEFAULTS = ("resolution", "resolution_type")
SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "train": TrainConfig, "validation": ValidationConfig}


class ConfigError(ValueError):
    """Every problem found in a config, each naming the file, the key and the fix; and the warnings found beside them."""

    def __init__(self, problems: list[str], warnings: list[str] = ()):
        self.problems, self.warnings = problems, list(warnings)
        super().__init__("\n".join(f"- {p}" for p in problems))


def strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments outside strings, keeping line numbers for JSON error messages."""
    out, i, in_string = [], 0, False
    while i < len(text):
        ch, nxt = text[i], text[i + 1 : i + 2]
        if in_string:
            out.append(ch)
            if ch == "\\":
                out.append(nxt)
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif ch + nxt == "//":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif ch + nxt == "/*":
            end = text.find("*/", i + 2)
            end = len(text) if end < 0 else end + 2
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def read_jsonc(path: Path) -> Any:
    """Parse a JSON file that may carry // and /* */ comments; errors name the file, line and column."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read ({err.strerror}). Fix: check the path."]) from None
    try:
        return json.loads(strip_json_comments(text))
    except json.JSONDecodeError as err:
        raise ConfigError([f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})."]) from None


def parse_resolutions(value: str | int) -> list[tuple[int, int]]:
    """`768x768`, `1024` (square) or `1024x1024,1280x768` -> [(width, height), ...]."""
    sizes = []
    for part in str(value).replace(" ", "").split(","):
        width, _, height = part.lower().partition("x")
        sizes.append((int(width), int(height or width)))
    return sizes


def sibling_dir(path: str, name: str) -> str:
    """`output/models` -> `output/cache`; works for local paths and s3:// URLs alike."""
    parent = path.rstrip("/").rpartition("/")[0]
    return f"{parent}/{name}" if parent and not parent.endswith(":/") else name


def nearest_on_grid(value: float, grid: int) -> int:
    return max(grid, int(round(value / grid)) * grid)


def split_flat(flat: dict[str, Any], source: str) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """Flat SimpleTuner keys -> (per-section dicts, warnings for keys longcat-ray does not use, problems: keys that
    would change what is trained and that longcat-ray does not do as SimpleTuner does)."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in (*SECTIONS, "data")}
    flat = {raw_key.lstrip("-"): value for raw_key, value in flat.items()}
    problems = refused_keys(flat, source)
    for current, legacy in ALIASES.items():
        if current in flat and legacy in flat and flat[current] != flat[legacy]:
            problems.append(f"{source}: keys '{current}' ({flat[current]}) and '{legacy}' ({flat[legacy]}) are the same "
                            f"setting (SimpleTuner's current and legacy names) with different values. Fix: keep '{current}'.")
        if current in flat:
            flat[legacy] = flat.pop(current)
    sections["data"]["dataset_defaults"] = {k: flat.pop(k) for k in DATASET_DEFAULTS if k in flat}
    unused = []
    for key, value in flat.items():
        if key in FLAT_KEYS:
            section, field = FLAT_KEYS[key]
            sections[section][field] = value
        else:
            unused.append(key)
    warnings = [f"{source}: key '{k}' is not used by longcat-ray (ignored)." for k in sorted(unused) if k not in REFUSED]
    return sections, warnings, problems


# Keys whose SimpleTuner meaning changes what is trained, and which longcat-ray does not do: refused unless they
# say what longcat-ray does anyway. key -> (accepted values, what longcat-ray does and the fix).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "lora_type": (("standard",), "longcat-ray trains a standard (PEFT) LoRA, not LyCORIS. Fix: \"lora_type\": \"standard\" "
                  "and remove \"lycoris_config\""),
    "lycoris_config": ((), "LyCORIS adapters (LoKr, LoHa) are not trained by longcat-ray. Fix: remove it and set "
                       "\"lora_type\": \"standard\" (lora_rank/lora_alpha size the LoRA)"),
    "grad_clip_method": (("norm",), "longcat-ray clips the gradients' global L2 norm at max_grad_norm, not each "
                         "value. Fix: \"grad_clip_method\": \"norm\", or remove it"),
    "peft_lora_mode": (("standard",), "longcat-ray trains a standard PEFT LoRA (no SingLoRA). Fix: remove it"),
    "lora_init_type": (("default",), "longcat-ray initialises the LoRA as PEFT's default does (A Kaiming-uniform, "
                       "B zero), as the official trainer does. Fix: \"lora_init_type\": \"default\", or remove it"),
    "flow_schedule_auto_shift": ((True,), "longcat-ray samples training sigmas with the resolution-dependent shift "
                                 "that LongCat's inference uses. Fix: \"flow_schedule_auto_shift\": true, or remove it"),
    "conditioning_multidataset_sampling": (("random",), "LongCat-Image-Edit takes one reference image, so several "
                                           "reference datasets cannot be stitched together; longcat-ray trains one "
                                           "(edit, reference) pair per edit each epoch, drawn at random. Fix: "
                                           "\"conditioning_multidataset_sampling\": \"random\", or remove it"),
    "flow_schedule_shift": ((), "longcat-ray samples training sigmas with the resolution-dependent shift that "
                            "LongCat's inference uses, not a fixed shift. Fix: remove it"),
}


def refused_keys(flat: dict[str, Any], source: str) -> list[str]:
    problems = []
    for key, (accepted, why) in REFUSED.items():
        if key in flat and flat[key] is not None and flat[key] not in accepted:
            if key == "flow_schedule_shift" and flat.get("flow_schedule_auto_shift") is True:
                continue  # SimpleTuner ignores the fixed shift when auto shift is on
            if key == "lycoris_config" and flat.get("lora_type", "standard") == "standard":
                continue  # a leftover path, unused by SimpleTuner itself for a standard LoRA
            problems.append(f"{source}: key '{key}': {flat[key]!r}: {why}.")
    return problems


def normalise_precision(section: dict[str, Any], source: str) -> list[str]:
    """Map SimpleTuner's precision spellings onto torchao's; returns notices."""
    value = section.get("base_model_precision")
    if value in PRECISION_SYNONYMS:
        section["base_model_precision"] = PRECISION_SYNONYMS[value]
        return [f"{source}: base_model_precision '{value}' runs as '{PRECISION_SYNONYMS[value]}' (torchao) here."]
    return []


def pydantic_problems(err: ValidationError, source: str, prefix: str, to_key) -> list[str]:
    """One message per pydantic error, naming the user's key rather than the tree's field."""
    problems = []
    for e in err.errors():
        key = to_key(e["loc"])
        problems.append(f"{source}: {prefix}key '{key}': {e['msg']} (got {e.get('input')!r}).")
    return problems


def flat_key_for(section: str):
    reverse = {v: k for k, v in FLAT_KEYS.items()}
    return lambda loc: reverse.get((section, str(loc[0])), str(loc[0])) + "".join(f"[{p}]" for p in loc[1:])


def build_sections(sections: dict[str, dict[str, Any]], source: str) -> tuple[dict[str, BaseModel], list[str]]:
    built, problems = {}, []
    for name, cls in SECTIONS.items():
        try:
            built[name] = cls(**sections[name])
        except ValidationError as err:
            problems += pydantic_problems(err, source, "", flat_key_for(name))
            built[name] = cls()
    return built, problems


def resolve_path(value: str, config_path: Path) -> Path:
    """SimpleTuner resolves relative paths against the working directory; fall back to the config's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    beside = config_path.parent / path
    return beside if beside.exists() else path


def load_datasets(path: Path, defaults: dict[str, Any] | None = None) -> tuple[list[DatasetConfig], list[str], list[str]]:
    """multidatabackend.json -> datasets, problems, warnings. `defaults` (config.json's top-level `resolution`,
    `resolution_type`) fill the image datasets that do not set their own, as SimpleTuner does."""
    entries = read_jsonc(path)
    if not isinstance(entries, list):
        return [], [f"{path}: expected a JSON list of datasets, got {type(entries).__name__}."], []
    datasets, problems, warnings = [], [], []
    for index, entry in enumerate(entries):
        label = f"dataset #{index} ({entry.get('id', '<no id>')!s})" if isinstance(entry, dict) else f"dataset #{index}"
        try:
            if isinstance(entry, dict) and entry.get("dataset_type", "image") in ("image", "conditioning"):
                entry = {**(defaults or {}), **entry}
            dataset = DatasetConfig(**entry) if isinstance(entry, dict) else DatasetConfig.model_validate(entry)
        except ValidationError as err:
            problems += pydantic_problems(err, str(path), f"{label}: ", lambda loc: ".".join(map(str, loc)))
            continue
        if dataset.dataset_type in EMBED_CACHES:
            warnings.append(f"{path}: {label}: dataset_type '{dataset.dataset_type}' is an embedding cache of other models "
                            "(Qwen-Edit's, Flux's); LongCat's text encoder reads the reference with the instruction and the "
                            "cache stage stores that embedding. Not used (ignored); nothing it holds changes training here.")
        extra = sorted((dataset.model_extra or {}).keys())
        warnings += [f"{path}: {label}: key '{k}' is not used by longcat-ray (ignored)." for k in extra]
        datasets.append(dataset)
    return datasets, problems, warnings


def check_model(model: ModelConfig, source: str) -> list[str]:
    if model.model_flavour == "edit":
        return []
    if model.model_flavour in ("final", "dev"):
        why = f"'{model.model_flavour}' is a LongCat-Image text-to-image flavour; this pipeline edits images"
    else:
        why = f"unknown flavour '{model.model_flavour}' (LongCat-Image flavours: edit, final, dev)"
    return [f"{source}: key 'model_flavour': {why}. Fix: set \"model_flavour\": \"edit\"."]


WEIGHT_ONLY = ("int8-torchao", "fp8-torchao")


def check_precision(model: ModelConfig, train: TrainConfig, source: str) -> list[str]:
    """A quantized base is swapped in after DeepSpeed places the model, and ZeRO-3 partitions those weights;
    torch.compile cannot yet take torchao's weight-only tensors (aliased subclass outputs, on an H200)."""
    precision, problems = model.base_model_precision, []
    if precision != "no_change" and train.zero_stage == 3:
        problems.append(f"{source}: key 'base_model_precision': '{precision}' cannot run with zero_stage 3 (ZeRO-3 "
                        "partitions the frozen base weights). Fix: set \"zero_stage\": 2, or \"base_model_precision\": \"no_change\".")
    if precision in WEIGHT_ONLY and train.compile:
        problems.append(f"{source}: key 'compile': torch.compile cannot take the '{precision}' base (torchao tensor "
                        "subclasses). Fix: remove \"compile\" (it is then off for this precision), or use "
                        "\"base_model_precision\": \"fp8-matmul\", which compiles.")
    if train.compile is False or precision in WEIGHT_ONLY:  # the keys below act on compiled blocks only
        why = "\"compile\": false" if train.compile is False else f"the '{precision}' base, which does not compile"
        if train.activation_memory_budget is not None:
            problems.append(f"{source}: key 'activation_memory_budget': the compiler chooses what to recompute, and {why} "
                            "turns compile off. Fix: remove \"activation_memory_budget\" (\"gradient_checkpointing\" "
                            "then recomputes whole blocks), or turn compile on.")
        if train.cuda_graphs:
            problems.append(f"{source}: key 'cuda_graphs': CUDA graphs replay the compiled blocks, and {why} turns "
                            "compile off. Fix: remove \"cuda_graphs\", or turn compile on.")
        if train.compile_dynamic is not None:
            problems.append(f"{source}: key 'compile_dynamic': it says how the compiled blocks meet new bucket shapes, "
                            f"and {why} turns compile off. Fix: remove \"compile_dynamic\", or turn compile on.")
    if train.cuda_graphs and train.offload_activations != "none":
        problems.append(f"{source}: key 'cuda_graphs': CUDA graphs keep the saved activations in their own memory pool, "
                        "so \"offload_activations\": \"cpu\" would free nothing. Fix: remove \"cuda_graphs\" (it is then "
                        "off), or set \"offload_activations\": \"none\".")
    return problems


def check_eval_dataset(config: Config, source: str) -> list[str]:
    wanted, edits = config.validation.dataset_id, [d.id for d in config.data.edit_datasets()]
    if wanted is None or wanted in edits or not edits:
        return []
    return [f"{source}: key 'eval_dataset_id': '{wanted}' is not an edit dataset of {config.data.data_backend_config}. "
            f"Fix: use one of {edits}, or remove it."]


def check_validation(validation: ValidationConfig, source: str) -> list[str]:
    problems = []
    for width, height in validation.resolution:
        if width % SIZE_GRID or height % SIZE_GRID or min(width, height) < SIZE_GRID:
            near = f"{nearest_on_grid(width, SIZE_GRID)}x{nearest_on_grid(height, SIZE_GRID)}"
            problems.append(
                f"{source}: key 'validation_resolution': {width}x{height} is off the {SIZE_GRID}-px grid. Fix: use {near}."
            )
    return problems


def check_links(data: DataConfig, path: str) -> list[str]:
    """Edit datasets must link an existing reference dataset; edit and reference VAE caches must differ."""
    ids = {d.id for d in data.datasets if not d.disabled}
    problems = []
    for edit in data.edit_datasets():
        missing = [ref for ref in edit.conditioning_data if ref not in ids]
        if missing:
            problems.append(
                f"{path}: dataset '{edit.id}': key 'conditioning_data' names {missing}, which no enabled dataset has as "
                f"'id' (ids: {sorted(ids)}). Fix: use the reference dataset's id."
            )
        if not edit.conditioning_data:
            problems.append(
                f"{path}: dataset '{edit.id}': no reference dataset linked (conditioning latents missing): the edit "
                "flavour needs a reference image for every edit. Fix: add \"conditioning_data\": [\"<reference dataset id>\"] "
                "pointing at a dataset of reference images with the same file names."
            )
        for ref in (data.dataset(r) for r in edit.conditioning_data if r in ids):
            if edit.cache_dir_vae and edit.cache_dir_vae == ref.cache_dir_vae:
                problems.append(
                    f"{path}: datasets '{edit.id}' and '{ref.id}' share cache_dir_vae '{edit.cache_dir_vae}'. "
                    "Fix: give edit and reference latents separate cache_dir_vae paths."
                )
    return problems


def link_sources(data: DataConfig, path: str) -> list[str]:
    """A reference dataset's `source_dataset_id` -> its id in that edit dataset's `conditioning_data`."""
    by_id, problems = {d.id: d for d in data.datasets}, []
    for dataset in data.datasets:
        source = by_id.get(dataset.source_dataset_id) if dataset.source_dataset_id else None
        if dataset.source_dataset_id and source is None:
            problems.append(f"{path}: dataset '{dataset.id}': key 'source_dataset_id' names '{dataset.source_dataset_id}', "
                            f"which no dataset has as 'id' (ids: {sorted(by_id)}). Fix: use the edit dataset's id.")
        elif source is not None and dataset.id not in source.conditioning_data:
            source.conditioning_data.append(dataset.id)
    return problems


def check_reference_keys(dataset: DatasetConfig, label: str) -> list[str]:
    """SimpleTuner's reference keys that longcat-ray cannot honour, refused by name."""
    problems = []
    if dataset.conditioning_type not in (None, "reference_strict"):
        why = ("a loosely aligned reference (bucketed on its own) cannot be given to LongCat-Image-Edit, which places "
               "the reference on its edit's latent grid" if dataset.conditioning_type == "reference_loose" else
               "that is not an edit reference (longcat-ray trains instruction edits, not ControlNets or masks)")
        problems.append(f"{label}: key 'conditioning_type': {dataset.conditioning_type!r}: {why}. Fix: "
                        "\"conditioning_type\": \"reference_strict\" (each reference resized to its edit's bucket), or remove it.")
    for spec in dataset.conditioning or []:
        kind = spec.get("type")
        if kind not in GENERATED_KINDS:
            problems.append(f"{label}: key 'conditioning': type {kind!r} does not make an edit reference longcat-ray "
                            f"generates (it makes {sorted(GENERATED_KINDS)}; masks, depth and the like are ControlNet "
                            "inputs). Fix: use one of those, or write your references into a folder and add it as a "
                            "dataset named in \"conditioning_data\".")
        elif spec.get("captions") not in (None, False):
            problems.append(f"{label}: key 'conditioning': 'captions' {spec['captions']!r} on the {kind} entry: the "
                            "instruction is the edit dataset's caption (one embedding per pair). Fix: remove 'captions', "
                            "and set the instruction on this dataset (e.g. caption_strategy instanceprompt).")
    return problems


GENERATED_KINDS = tuple(GENERATORS)


def add_generated_references(data: DataConfig, path: str) -> list[str]:
    """Each edit dataset's `conditioning` entries -> reference datasets `<id>_conditioning_<type>` (SimpleTuner's ids)
    over the edit dataset's own images, named in its `conditioning_data`. -> problems (an id already taken)."""
    problems = []
    for edit in [d for d in data.datasets if d.conditioning and d.dataset_type == "image" and not d.disabled]:
        for spec in edit.conditioning:
            ref_id = f"{edit.id}_conditioning_{spec.get('type')}"
            if any(d.id == ref_id for d in data.datasets):
                problems.append(f"{path}: dataset '{edit.id}': key 'conditioning' makes a reference dataset '{ref_id}', "
                                "an id another dataset already has (or a type listed twice). Fix: rename that dataset.")
                continue
            fields = edit.model_dump(exclude_unset=True, exclude={"id", "conditioning", "conditioning_data", "cache_dir_vae", "caption_strategy",
                                              "minimum_image_size", "repeats"})
            data.datasets.append(DatasetConfig(**{**fields, "id": ref_id, "dataset_type": "conditioning",
                                                  "caption_strategy": None, "generator": spec}))
            edit.conditioning_data.append(ref_id)
    return problems


HUB_FILTERS = ("collection", "quality_thresholds", "quality_column", "min_width", "min_height")


def check_hub_keys(dataset: DatasetConfig, label: str) -> list[str]:
    """A Hugging Face dataset's keys: what longcat-ray reads, and what it would read differently from SimpleTuner."""
    if dataset.type != "huggingface":
        hub_only = [k for k in ("dataset_name", "huggingface") if k in dataset.model_fields_set]
        return [f"{label}: key '{k}' is for \"type\": \"huggingface\" datasets. Fix: set that type, or remove it."
                for k in hub_only]
    hub, problems = dataset.hub, []
    if not hub["dataset_name"]:
        problems.append(f"{label}: key 'dataset_name' is missing. Fix: the hub id (user/name) or a local copy's folder.")
    if dataset.caption_strategy in ("textfile", "filename"):
        problems.append(f"{label}: caption_strategy '{dataset.caption_strategy}' has no files to read in a Hugging Face "
                        "dataset. Fix: \"caption_strategy\": \"huggingface\" (the caption column) or \"instanceprompt\".")
    if dataset.caption_strategy == "huggingface" and not hub["caption_column"]:
        problems.append(f"{label}: key 'caption_column' is missing for caption_strategy 'huggingface'. Fix: name the "
                        "instruction's column (\"a.b\" for key b of column a).")
    if isinstance(hub["caption_column"], list) and len(hub["caption_column"]) != 1:
        problems.append(f"{label}: key 'caption_column': {hub['caption_column']}: longcat-ray caches one instruction "
                        "embedding per pair, so it cannot draw among several caption columns. Fix: name one column.")
    unknown = sorted(set(hub.get("filter_func") or {}) - set(HUB_FILTERS))
    if unknown:
        problems.append(f"{label}: key 'filter_func': {unknown} are not SimpleTuner's filters (it reads "
                        f"{list(HUB_FILTERS)}), so nothing would be filtered by them. Fix: remove them.")
    composite = hub.get("composite_image_config") or {}
    if composite.get("enabled") and not 0 <= int(composite.get("select_index", 0)) < int(composite.get("image_count", 1)):
        problems.append(f"{label}: key 'composite_image_config': select_index {composite.get('select_index')} is not "
                        f"one of the {composite.get('image_count')} panels. Fix: 0 to image_count - 1.")
    return problems


def check_dataset(dataset: DatasetConfig, data: DataConfig, path: str) -> list[str]:
    label = f"{path}: dataset '{dataset.id}'"
    if dataset.dataset_type in ("text_embeds", *EMBED_CACHES) or dataset.disabled:
        return []
    problems = check_reference_keys(dataset, label)
    if dataset.type == "local" and not dataset.instance_data_dir:
        problems.append(f"{label}: key 'instance_data_dir' is missing. Fix: point it at the folder of images.")
    if dataset.type == "aws" and not dataset.aws_bucket_name:
        problems.append(f"{label}: key 'aws_bucket_name' is missing for an aws dataset. Fix: name the S3 bucket.")
    problems += check_hub_keys(dataset, label)
    if dataset.resolution_type != "area" and dataset.resolution % data.aspect_bucket_alignment:
        near = nearest_on_grid(dataset.resolution, data.aspect_bucket_alignment)
        problems.append(
            f"{label}: key 'resolution': {dataset.resolution:g} is off the {data.aspect_bucket_alignment}-px grid. Fix: use {near}."
        )
    if dataset.caption_strategy == "instanceprompt" and not dataset.instance_prompt:
        problems.append(f"{label}: caption_strategy 'instanceprompt' needs key 'instance_prompt'. Fix: set the instruction.")
    return problems


def finish_data(data: DataConfig, path: Path, output_dir: str) -> tuple[list[str], list[str]]:
    """Fill per-dataset defaults, then run the data checks. Returns (problems, warnings)."""
    problems, warnings = [], []
    if data.aspect_bucket_alignment != GRID:
        problems.append(
            f"{data.data_backend_config}: key 'aspect_bucket_alignment': {data.aspect_bucket_alignment} is not supported; "
            f"LongCat buckets live on the {GRID}-px grid. Fix: set \"aspect_bucket_alignment\": {GRID}."
        )
    problems += link_sources(data, str(path))
    problems += add_generated_references(data, str(path))
    references = {r for d in data.edit_datasets() for r in d.conditioning_data}
    for dataset in data.datasets:
        if dataset.dataset_type == "text_embeds" and dataset.cache_dir and not dataset.disabled:
            data.text_cache_dir = dataset.cache_dir
            data.text_cache_options = dataset.storage_options
        if dataset.id in references and dataset.dataset_type == "image":
            dataset.dataset_type = "conditioning"
        if dataset.dataset_type == "image" and "caption_strategy" not in dataset.model_fields_set:
            dataset.caption_strategy = "huggingface" if dataset.type == "huggingface" else "filename"
        if dataset.cache_dir_vae is None and dataset.dataset_type in ("image", "conditioning"):
            dataset.cache_dir_vae = f"{sibling_dir(output_dir, 'cache')}/vae/{dataset.id}"
        problems += check_dataset(dataset, data, str(path))
    if not data.edit_datasets():
        problems.append(f"{path}: no enabled edit (image) dataset. Fix: add one with \"conditioning_data\" naming its references.")
    problems += check_links(data, str(path))
    for dataset in data.datasets:
        if dataset.id in references and dataset.caption_strategy is not None:
            warnings.append(
                f"{path}: reference dataset '{dataset.id}' has caption_strategy '{dataset.caption_strategy}': its "
                "captions will replace the edit instructions (usually unwanted). Fix: set \"caption_strategy\": null."
            )
    return problems, warnings


def load_config(path: str | os.PathLike) -> tuple[Config, list[str]]:
    """config.json (+ its data backend JSON) -> (Config, warnings). Raises ConfigError with every problem."""
    config_path = Path(path)
    flat = read_jsonc(config_path)
    if not isinstance(flat, dict):
        raise ConfigError([f"{config_path}: expected a JSON object of settings, got {type(flat).__name__}."])
    sections, warnings, refused = split_flat(flat, str(config_path))
    warnings += normalise_precision(sections["model"], str(config_path))
    built, problems = build_sections(sections, str(config_path))
    problems = refused + problems
    problems += check_model(built["model"], str(config_path)) + check_validation(built["validation"], str(config_path))
    problems += check_precision(built["model"], built["train"], str(config_path))
    data, data_problems, data_warnings = load_data(sections["data"], config_path, built["train"].output_dir)
    config = Config(source=str(config_path), data=data, **built)
    problems += data_problems + check_eval_dataset(config, str(config_path))
    if problems:
        raise ConfigError(problems, warnings + data_warnings)
    return config, warnings + data_warnings


def load_data(section: dict[str, Any], config_path: Path, output_dir: str) -> tuple[DataConfig, list[str], list[str]]:
    try:
        data = DataConfig(**section)
    except ValidationError as err:
        return DataConfig(), pydantic_problems(err, str(config_path), "", flat_key_for("data")), []
    backend = resolve_path(data.data_backend_config, config_path)
    if not backend.exists():
        return data, [
            f"{config_path}: key 'data_backend_config': {backend} does not exist. Fix: point it at your multidatabackend.json."
        ], []
    data.data_backend_config = str(backend)
    datasets, problems, warnings = load_datasets(backend, data.dataset_defaults)
    data.datasets = datasets
    if not problems:
        more_problems, more_warnings = finish_data(data, backend, output_dir)
        problems, warnings = problems + more_problems, warnings + more_warnings
    return data, problems, warnings
