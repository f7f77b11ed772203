"""One reader for every LoRA layout users bring, so validate, the CLI and Serve load them alike.

Layouts (weights from .safetensors only, never pickle):
- diffusers: `transformer.<module>.lora_A.weight` / `lora_B.weight` (ours, `pytorch_lora_weights.safetensors`),
  or the same keys unprefixed (`transformer.save_lora_adapter()`); rank and alpha from the file's
  `lora_adapter_metadata`.
- PEFT: a folder with `adapter_config.json` + `adapter_model.safetensors` (`base_model.model.<module>...`: the
  official LongCat trainer's `checkpoints-N/`, `peft.save_pretrained`, our `output_dir/adapter/`); rank and alpha
  from `adapter_config.json` (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`).
- ComfyUI / kohya: `diffusion_model.<module>.lora_down.weight` / `lora_up.weight` (or lora_A/lora_B), or
  `lora_unet_<module with _>.lora_down.weight`, each with a `.alpha` tensor (SimpleTuner's `lora_format: comfyui`).
When nothing in the file says alpha, alpha = rank (scale 1) is assumed and said (`LoraWeights.alpha_source`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name; longcat_ray/export.py writes these layouts too
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
KOHYA_PREFIX = "lora_unet_"
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight$")
OTHER_ADAPTERS = {"lokr_": "LyCORIS LoKr", "lora_te": "text-encoder LoRA", "hada_": "LyCORIS LoHa", "dora_scale": "DoRA"}


class LoraError(ValueError):
    """A LoRA that cannot be loaded; the message names the file and what to do."""


@dataclass
class LoraWeights:
    file: str
    layout: str  # diffusers | peft | comfyui | kohya
    state: dict[str, torch.Tensor]  # "<module>.lora_A.weight" [r, in] / "<module>.lora_B.weight" [out, r]
    ranks: dict[str, int]
    alphas: dict[str, float]
    alpha_source: str  # where alpha came from, or "assumed: alpha = rank"
    origin: dict[str, str]  # state key -> the key as the file spells it (for messages)

    def lora_config(self) -> dict[str, Any]:
        """PEFT LoraConfig kwargs: the commonest rank/alpha, patterns (anchored module names) for the rest."""
        rank = Counter(self.ranks.values()).most_common(1)[0][0]
        alpha = Counter(self.alphas.values()).most_common(1)[0][0]
        return {
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": sorted(self.ranks),
            "rank_pattern": {re.escape(m): r for m, r in self.ranks.items() if r != rank},
            "alpha_pattern": {re.escape(m): a for m, a in self.alphas.items() if a != alpha},
        }


def locate(path: str) -> tuple[str, str | None]:
    """A LoRA path (file, our output_dir, a PEFT folder) -> (weights file, adapter_config.json or None)."""
    if os.path.isdir(path):
        for weights, config in ((LORA_FILE, None), (PEFT_WEIGHTS, PEFT_CONFIG)):
            if os.path.isfile(os.path.join(path, weights)):
                config_path = os.path.join(path, config) if config else None
                return os.path.join(path, weights), config_path if config_path and os.path.isfile(config_path) else None
        raise LoraError(f"{path}: a folder without {LORA_FILE} (diffusers) or {PEFT_WEIGHTS} (PEFT). Fix: pass the "
                        "LoRA's .safetensors file, or the folder that holds one of those")
    if not path.endswith(".safetensors"):
        raise LoraError(f"{path}: LoRA weights load from .safetensors only (never pickle). Fix: convert it, or pass the "
                        f"folder holding {LORA_FILE} or {PEFT_WEIGHTS}")
    if not os.path.isfile(path):
        raise LoraError(f"{path}: no such LoRA file")
    beside = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    return path, beside if os.path.basename(path) == PEFT_WEIGHTS and os.path.isfile(beside) else None


def read_lora(path: str, module_names: list[str]) -> LoraWeights:
    """Any supported layout at `path` -> LoraWeights keyed by `module_names` (the transformer's)."""
    from safetensors import safe_open

    file, config_path = locate(path)
    try:
        with safe_open(file, "pt") as handle:
            raw = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as err:  # noqa: BLE001 -- a truncated or foreign file: say which
        raise LoraError(f"{file}: not a readable safetensors file ({err})") from None
    layout, state, alpha_tensors, origin = normalise(file, raw, module_names)
    ranks = {key.rsplit(".lora_B", 1)[0]: int(t.shape[1]) for key, t in state.items() if ".lora_B." in key}
    alphas, source = resolve_alphas(file, ranks, alpha_tensors, metadata, config_path)
    if source.startswith("assumed"):
        log.warning("%s says nothing of the LoRA's alpha: loading it at alpha = rank (scale 1); its trained strength "
                    "may differ. Fix: give it lora_adapter_metadata, an adapter_config.json, or .alpha tensors", file)
    return LoraWeights(file, layout, state, ranks, alphas, source, origin)


def normalise(file: str, raw: dict[str, torch.Tensor], module_names: list[str]):
    """-> (layout, {"<module>.lora_A/B.weight": tensor}, {module: alpha from .alpha tensors}, {key: file's key})."""
    layout = check_keys(file, list(raw))
    dotted = {name.replace(".", "_"): name for name in module_names}
    state, alphas, origin = {}, {}, {}
    for key, tensor in raw.items():
        name = module_key(key, dotted)
        if name.endswith(".alpha"):
            alphas[name.removesuffix(".alpha")] = float(tensor.item())
            continue
        match = LORA_KEY.match(name)
        kind = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(match["kind"], match["kind"])
        state[f"{match['module']}.{kind}.weight"] = tensor
        origin[f"{match['module']}.{kind}.weight"] = key
    return layout, state, alphas, origin


def check_keys(file: str, keys: list[str]) -> str:
    """The layout the keys are in; LoraError naming the file when they are not a DiT LoRA's."""
    refuse_other_adapters(file, keys)
    names = {key: module_key(key, {}) for key in keys}
    unknown = [key for key, name in names.items() if not name.endswith(".alpha") and not LORA_KEY.match(name)]
    if unknown or not keys:
        shown = ", ".join(unknown[:5]) or "(no keys)"
        raise LoraError(f"{file}: {len(unknown)} key(s) are not LoRA factors of this model's layers ({shown}). Loaded: "
                        "diffusers, PEFT, ComfyUI (diffusion_model.*) and kohya (lora_unet_*) LoRA files")
    first = keys[0]
    return ("kohya" if first.startswith(KOHYA_PREFIX) else "comfyui" if first.startswith("diffusion_model.")
            else "peft" if first.startswith("base_model.model.") else "diffusers")


def read_header(handle) -> tuple[list[str], dict[str, str]]:
    """A safetensors file's tensor names and metadata from its header alone (an open binary file, local or remote)."""
    size = int.from_bytes(handle.read(8), "little")
    if not 0 < size < 100 * 2**20:
        raise LoraError("not a safetensors file (bad header length)")
    header = json.loads(handle.read(size))
    return [key for key in header if key != "__metadata__"], header.get("__metadata__") or {}


def describe(fs, path: str) -> dict[str, Any]:
    """{"layout", and what is known of "rank", "alpha", "steps", "base_model"} of the LoRA at `path` on `fs` from
    its header (and a PEFT folder's adapter_config.json), or {"error"}: what /v1/loras shows, without loading the
    weights (whether it fits the served model shows when a request loads it)."""
    try:
        with fs.open(path, "rb") as handle:
            keys, metadata = read_header(handle)
        return {"layout": check_keys(path, keys), **training_facts(fs, path, metadata)}
    except (LoraError, ValueError, OSError) as err:
        return {"error": str(err)}


def training_facts(fs, path: str, metadata: dict[str, str]) -> dict[str, Any]:
    """Rank, alpha, steps and base model from our export's `longcat_ray` metadata, diffusers' LoraConfig metadata
    or the adapter_config.json beside a PEFT file; only what one of them states."""
    try:  # facts only: a file whose metadata cannot be read still loads
        ours, config = json.loads(metadata.get("longcat_ray") or "{}"), peft_metadata(metadata) or {}
    except ValueError:
        ours, config = {}, {}
    beside = f"{path.rsplit('/', 1)[0]}/{PEFT_CONFIG}" if path.endswith(PEFT_WEIGHTS) else None
    if not config and beside and fs.isfile(beside):
        with fs.open(beside, "rb") as handle:
            config = json.load(handle)
    facts = {"rank": ours.get("rank", config.get("r")), "alpha": ours.get("alpha", config.get("lora_alpha")),
             "steps": ours.get("steps"), "base_model": ours.get("base_model", config.get("base_model_name_or_path"))}
    return {key: value for key, value in facts.items() if value is not None}


def module_key(key: str, dotted: dict[str, str]) -> str:
    """A file's key -> `<module>.<rest>` in the transformer's own dotted names."""
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    if key.startswith(KOHYA_PREFIX):
        head, _, rest = key[len(KOHYA_PREFIX):].partition(".")
        return f"{dotted.get(head, head)}.{rest}"
    return key


def refuse_other_adapters(file: str, keys) -> None:
    for marker, kind in OTHER_ADAPTERS.items():
        if any(marker in key for key in keys):
            raise LoraError(f"{file}: a {kind} file ('{marker}' keys). longcat-ray loads LoRA adapters of the DiT only "
                            "(diffusers, PEFT, ComfyUI or kohya layout)")


def resolve_alphas(file: str, ranks: dict[str, int], tensors: dict[str, float], metadata: dict[str, str],
                   config_path: str | None):
    """-> ({module: alpha}, where it came from). `.alpha` tensors, then the file's metadata, then adapter_config.json."""
    if tensors:
        missing = sorted(set(ranks) - set(tensors))
        if missing:
            raise LoraError(f"{file}: .alpha tensors are missing for {len(missing)} module(s), e.g. {missing[0]}")
        return {m: tensors[m] for m in ranks}, ".alpha tensors"
    for config, source in ((peft_metadata(metadata), "lora_adapter_metadata"), (read_json(config_path), PEFT_CONFIG)):
        if config and config.get("lora_alpha") is not None:
            return {m: pattern_value(config.get("alpha_pattern") or {}, m, float(config["lora_alpha"])) for m in ranks}, source
    return {m: float(r) for m, r in ranks.items()}, "assumed: alpha = rank"


def peft_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    """diffusers' `lora_adapter_metadata` (LoraConfig fields, keys with or without `transformer.`)."""
    if "lora_adapter_metadata" not in metadata:
        return None
    fields = json.loads(metadata["lora_adapter_metadata"])
    return {k.removeprefix("transformer."): v for k, v in fields.items()}


def read_json(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise LoraError(f"{path}: unreadable adapter config ({err})") from None


def pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rule for rank_pattern/alpha_pattern: a key matches a module name's dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key.removeprefix('^')})$", module):
            return float(value)
    return default
