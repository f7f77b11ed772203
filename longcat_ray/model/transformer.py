"""The trained model: LongCat's DiT, frozen (bf16 / int8 / fp8 via torchao), with a peft LoRA adapter."""

from __future__ import annotations

import torch

from longcat_ray.config import LoraConfig, ModelConfig

ADAPTER = "default"


def load_transformer(model: ModelConfig, dtype: torch.dtype, device: torch.device):
    """The DiT from a pipeline folder or hub id, frozen, optionally weight-quantised by torchao."""
    from diffusers import LongCatImageTransformer2DModel

    transformer = LongCatImageTransformer2DModel.from_pretrained(
        model.pretrained_model_name_or_path, subfolder="transformer", revision=model.revision, torch_dtype=dtype
    ).to(device)
    transformer.requires_grad_(False)
    quantize_base(transformer, model.base_model_precision)
    return transformer


def quantize_base(transformer, precision: str) -> None:
    """Weight-only int8/fp8 of the frozen linears, before LoRA wraps them (LoRA stays in high precision)."""
    if precision == "no_change":
        return
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    quantize_(transformer, Int8WeightOnlyConfig() if precision == "int8-torchao" else Float8WeightOnlyConfig())


def add_lora(transformer, lora: LoraConfig, seed: int) -> list[torch.nn.Parameter]:
    """Attach the adapter (initialised from `seed`, identically on every rank); returns its parameters."""
    from peft import LoraConfig as PeftLoraConfig

    torch.manual_seed(seed)
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or lora.rank,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        init_lora_weights=True,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for param in params:
        param.requires_grad_(True)
    return params
