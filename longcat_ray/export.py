"""LoRA export: diffusers' `pytorch_lora_weights.safetensors` (keys prefixed `transformer.`, the LoRA
config in the file's metadata so alpha/rank survives) and a PEFT adapter directory, plus our metadata; with
`lora_format: comfyui` (SimpleTuner's key) also a ComfyUI file as SimpleTuner writes one (`diffusion_model.<module>.
lora_A/lora_B.weight` and a `.alpha` tensor per module)."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from longcat_ray.lora_files import LORA_FILE, PEFT_CONFIG, PEFT_WEIGHTS, pattern_value
from longcat_ray.model.transformer import ADAPTER
from longcat_ray.storage import filesystem, join, write_bytes_atomic

PEFT_DIR = "adapter"
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The adapter's weights, keyed as peft names them without the adapter name, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def adapter_config_dict(transformer) -> dict[str, Any]:
    config = transformer.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def comfyui_state(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """peft-named factors -> ComfyUI's keys, each module's alpha as a tensor beside them."""
    out = {}
    for key, tensor in state.items():
        module = key.partition(".lora_")[0]
        out[f"diffusion_model.{key}"] = tensor
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, float(config["lora_alpha"]))
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
    return out


def export_lora(transformer, url: str, options: dict[str, Any], meta: dict[str, Any], comfyui: bool = False) -> None:
    """Write the formats under `url` (local or s3://). Call with full (gathered) weights, on one rank."""
    state, config = lora_state_dict(transformer), adapter_config_dict(transformer)
    diffusers_meta = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True),
        "longcat_ray": json.dumps(meta, sort_keys=True),
    }
    fs, root = filesystem(url, options)
    weights = save_safetensors({f"transformer.{k}": v for k, v in state.items()}, metadata=diffusers_meta)
    write_bytes_atomic(fs, join(root, LORA_FILE), weights)
    peft_weights = save_safetensors({f"base_model.model.{k}": v for k, v in state.items()}, metadata={"format": "pt"})
    write_bytes_atomic(fs, join(root, PEFT_DIR, PEFT_WEIGHTS), peft_weights)
    peft_config = {**config, "base_model_name_or_path": meta.get("base_model")}
    write_bytes_atomic(fs, join(root, PEFT_DIR, PEFT_CONFIG), json.dumps(peft_config, indent=2).encode())
    write_bytes_atomic(fs, join(root, "longcat_ray.json"), json.dumps(meta, indent=2).encode())
    if comfyui:
        write_bytes_atomic(fs, join(root, COMFYUI_FILE), save_safetensors(comfyui_state(state, config), metadata={"format": "pt"}))
