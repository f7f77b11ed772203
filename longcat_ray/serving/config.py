"""The serving config: the `args` of serve/config.yaml, or the flags of `longcat-ray serve`."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from longcat_ray.config import SIZE_GRID, Section, nearest_on_grid, parse_resolutions

TOKEN_ENV = "LONGCAT_RAY_API_TOKEN"


class ServeConfig(Section):
    model: str
    """The base pipeline: a local diffusers folder or a hub id (the same loader as training and validation)."""
    lora_root: str | None = None
    """Where adapters live (local folder or s3://): `<root>/<id>/pytorch_lora_weights.safetensors` (an exported
    training output_dir) or `<root>/<id>.safetensors`. Requests name adapters by `<id>` only."""
    lora_storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec options for an s3:// lora_root (endpoint_url, ...); credentials come from the environment."""
    num_gpus: float | None = None
    """GPUs per model replica; None = 1 when the process starting Serve sees a GPU, else 0 (CPU)."""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling floor for model replicas (0 lets an idle cluster give its GPUs back)."""
    max_replicas: int = Field(1, ge=1)
    """Autoscaling ceiling for model replicas."""
    target_ongoing_requests: float = Field(4, gt=0)
    """Autoscaling target: requests queued or running per replica."""
    max_batch_size: int = Field(4, ge=1)
    """Requests of one size, step count and LoRA share a denoising batch of up to this many."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long an idle replica waits for more requests to join the first one's batch (requests that arrive while
    it runs a batch wait for the next one anyway). Every lone request pays it: Serve's own default, 10 ms."""
    max_queued_requests: int = Field(64, ge=1)
    """Edits waiting for a model replica beyond what the replicas hold (`2 * max_batch_size` each); past it a new
    request is answered 503 with `Retry-After` at once instead of waiting without bound. Serve's router counts an
    edit as waiting until a replica takes it, so a burst arriving at once may see 503s beyond this many even while the
    replicas have room (ray/serve/_private/router.py says so); size it for the largest burst to absorb."""
    retry_after_s: int = Field(10, ge=1)
    """The `Retry-After` (seconds) of that 503."""
    max_loras_per_replica: int = Field(4, ge=1)
    """LoRAs kept loaded per replica, their weights on the GPU ready to swap in (least recently used dropped
    first); the DiT carries the one a batch asks for."""
    max_upload_bytes: int = Field(20 * 2**20, ge=1024)
    """Largest request body accepted (413 above)."""
    upload_timeout_s: float = Field(120, gt=0)
    """Time a client has to send its whole request body (408 after): a slow-loris client trickling bytes would
    otherwise hold an ingress slot without bound. 20 MB at 120 s is a 1.4 Mbit/s link."""
    max_input_pixels: int = Field(40_000_000, ge=1)
    """Largest uploaded image in pixels, checked from the header before decoding (decompression bombs: 413)."""
    max_side: int = Field(2048, ge=SIZE_GRID)
    """Largest output width or height."""
    max_steps: int = Field(100, ge=1)
    """Most denoising steps a request may ask for."""
    max_guidance: float = Field(20.0, gt=0)
    """Largest guidance_scale a request may ask for."""
    default_steps: int = Field(40, ge=1)
    default_guidance: float = Field(4.5, ge=0)
    default_area: int = Field(1024 * 1024, ge=SIZE_GRID * SIZE_GRID)
    """Output pixel area when a request gives neither width nor height (the pipeline's ~1 MP)."""
    quantize: Literal["none", "fp8", "fp8-fast"] = "none"
    """GPU only: `fp8` runs the DiT's linears as fp8 matmuls (scales per token row and per weight row, as
    training's `fp8-matmul` base but row-wise; modulation in int8): faster on H100-class cards, half the DiT's
    memory, an approximation of bf16. `fp8-fast`: the same with the tensor cores' fast fp8 accumulation, 6% faster
    again on an H200 at 768² (5.28 against 5.64 s per 40-step edit) and less exact (the image moved by 0.9 of 255
    per pixel on average; benchmarks/RESULTS.md)."""
    compile: bool = False
    """GPU only: torch.compile the repeated DiT blocks (each new size/batch shape compiles once, ~a minute)."""
    compile_cache_dir: str | None = None
    """With `compile`: where replicas keep their compiled kernels (local folder or s3://, `lora_storage_options`
    apply), keyed by model, torch version, GPU and levers. The first replica saves them after its warm-up; later
    and restarted ones load them first and compile from cache."""
    warmup_sizes: list[tuple[int, int]] | None = None
    """Output sizes (`WxH` as `validation_resolution` writes them: a list, or one string `1024x1024,768x768`; a bare
    `1024` is square; 16-px grid) each replica edits before it reports ready, at a batch of one and of
    `max_batch_size`, 2 steps, the default guidance: Serve routes nothing to a replica until then, so with `compile`
    no request waits for a compile of those sizes. Null: the square of `default_area` when the replica compiles on a
    GPU (`compile`), none otherwise (nothing would compile; on a CPU a 1024² warm-up takes minutes); []: no warm-up."""
    warmup_lora: str | None = None
    """An adapter id under `lora_root` that the warm-up also edits with (and then without, the base behind LoRA
    layers), so that with `compile` the first request for any adapter of its ranks and targets does not wait for a
    compile (without it the first adapter on a replica compiled for 14 s, and the base after it for 4 s, H200 768²;
    with it, not yet measured on a GPU). Doubles the warm-up's edits."""
    api_token: str | None = None
    """Bearer token for /v1/*; None reads the LONGCAT_RAY_API_TOKEN environment variable; unset = no auth."""

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        if value is None:
            return None
        texts = [value] if isinstance(value, (str, int)) else value
        try:
            return [size for text in texts for size in (parse_resolutions(text) if isinstance(text, (str, int)) else [text])]
        except ValueError:
            raise ValueError(f"warmup_sizes: {value!r} is not WIDTHxHEIGHT (e.g. 768x768)") from None

    @model_validator(mode="after")
    def check_ranges(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.warmup_lora and not self.lora_root:
            raise ValueError(f"warmup_lora: {self.warmup_lora!r} needs lora_root (the folder or s3:// prefix it is in)")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps {self.default_steps} > max_steps {self.max_steps}")
        for width, height in self.warmup_sizes or []:
            if any(s % SIZE_GRID or not SIZE_GRID <= s <= self.max_side for s in (width, height)):
                raise ValueError(f"warmup_sizes: {width}x{height} needs sides on the {SIZE_GRID}-px grid up to "
                                 f"max_side {self.max_side} (e.g. 768x768)")
        return self

    def warmup_shapes(self, compiling: bool = True) -> list[tuple[int, int]]:
        """`warmup_sizes` as (width, height); null -> the square of default_area on the grid if `compiling`, else
        none."""
        if self.warmup_sizes is None and not compiling:
            return []
        if self.warmup_sizes is None:
            side = min(nearest_on_grid(self.default_area**0.5, SIZE_GRID), self.max_side - self.max_side % SIZE_GRID)
            return [(side, side)]
        return list(self.warmup_sizes)

    def token(self) -> str | None:
        return self.api_token or os.environ.get(TOKEN_ENV) or None

    def gpus(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
