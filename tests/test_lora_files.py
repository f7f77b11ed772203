"""LoRA files as the real libraries write them load at their trained strength (longcat_ray/lora_files.py).

One random adapter (rank 4, alpha 8: scale 2, B non-zero) is written in each layout; each file is loaded into a
fresh tiny DiT through `inference.load_lora` and must give the same output as the adapter it came from."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_ray.config import LoraConfig, ModelConfig
from longcat_ray.export import COMFYUI_FILE, LORA_FILE, PEFT_DIR, export_lora, lora_state_dict
from longcat_ray.inference import LoraError, load_lora
from longcat_ray.model import flow
from longcat_ray.model.latents import pack_latents
from longcat_ray.model.transformer import ADAPTER, add_lora, load_transformer

RANK, ALPHA = 4, 8.0


def fresh(tiny):
    return load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.float32, torch.device("cpu")).eval()


def output(transformer) -> torch.Tensor:
    """The DiT's velocity on fixed random inputs (an edit at sigma 0.5 with its reference and a prompt)."""
    inputs = torch.Generator().manual_seed(1)
    edit, ref = (pack_latents(t) for t in torch.randn(2, 1, 16, 8, 8, generator=inputs))
    text = torch.randn(1, 6, transformer.config.joint_attention_dim, generator=inputs)
    txt_ids, img_ids = flow.edit_position_ids(6, 4, 4)
    with torch.no_grad():
        return flow.predict_velocity(transformer, edit, ref, text, txt_ids, img_ids, torch.tensor([0.5]))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """(transformer with the adapter, its output, the base's output, a folder of files in every layout)."""
    transformer = fresh(tiny)
    base = output(transformer)
    add_lora(transformer, LoraConfig(rank=RANK, alpha=ALPHA), seed=0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path_factory.mktemp("loras")
    export_lora(transformer, str(out / "ours"), {}, {"alpha": ALPHA}, comfyui=True)
    transformer.save_lora_adapter(str(out / "diffusers_saved"), adapter_name=ADAPTER)
    state = lora_state_dict(transformer)  # "<module>.lora_A.weight": peft's names
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    comfy = {key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): t for key, t in state.items()}
    save_file({f"diffusion_model.{k}": v for k, v in comfy.items()}
              | {f"diffusion_model.{m}.alpha": torch.tensor(ALPHA) for m in modules}, str(out / "comfyui.safetensors"))
    kohya = {}
    for key, tensor in comfy.items():
        module, _, rest = key.partition(".lora_")
        kohya[f"lora_unet_{module.replace('.', '_')}.lora_{rest}"] = tensor
    save_file(kohya | {f"lora_unet_{m.replace('.', '_')}.alpha": torch.tensor(ALPHA) for m in modules}, str(out / "kohya.safetensors"))
    save_file({f"transformer.{k}": v for k, v in state.items()}, str(out / "no_alpha.safetensors"))
    return transformer, output(transformer), base, out


def peft_saved(tiny, trained_transformer, folder: str) -> str:
    """peft's own save_pretrained of the same adapter (the official trainer's checkpoint layout)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict

    config = trained_transformer.peft_config[ADAPTER]
    model = get_peft_model(fresh(tiny), PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(config.target_modules)))
    state = {f"base_model.model.{k}": v for k, v in lora_state_dict(trained_transformer).items()}
    assert not set_peft_model_state_dict(model, state).unexpected_keys
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout", ["ours", "ours_file", "ours_peft", "ours_comfyui", "diffusers_saved", "peft_saved", "comfyui",
                                    "kohya"])
def test_every_layout_loads_at_its_trained_strength(tiny, trained, layout, caplog):
    transformer, expected, base, out = trained
    path = {
        "ours": out / "ours",
        "ours_file": out / "ours" / LORA_FILE,
        "ours_peft": out / "ours" / PEFT_DIR,
        "ours_comfyui": out / "ours" / COMFYUI_FILE,  # lora_format: comfyui
        "diffusers_saved": out / "diffusers_saved",
        "peft_saved": None,
        "comfyui": out / "comfyui.safetensors",
        "kohya": out / "kohya.safetensors",
    }[layout]
    path = peft_saved(tiny, transformer, str(out / "peft_saved")) if path is None else str(path)
    model = fresh(tiny)
    with caplog.at_level(logging.WARNING, logger="longcat_ray.lora_files"):
        weights = load_lora(model, path, "user")
    assert "assumed" not in weights.alpha_source and not caplog.records
    assert set(weights.alphas.values()) == {ALPHA}
    assert (expected - base).abs().mean() > 10 * (output(model) - expected).abs().max()  # a clear change, reproduced
    assert same(output(model), expected)


def test_a_file_that_does_not_say_alpha_loads_at_scale_1_and_says_so(tiny, trained, caplog):
    _, expected, base, out = trained
    model = fresh(tiny)
    with caplog.at_level(logging.WARNING, logger="longcat_ray.lora_files"):
        weights = load_lora(model, str(out / "no_alpha.safetensors"), "user")
    assert weights.alpha_source == "assumed: alpha = rank"
    assert "says nothing of the LoRA's alpha" in caplog.text and "no_alpha.safetensors" in caplog.text
    assert not same(output(model), expected)  # scale 1, not the trained 2


def test_peft_config_alpha_is_the_strength(tiny, trained, tmp_path):
    """The official trainer leaves lora_alpha at PEFT's default 8 whatever the rank: read, never assumed."""
    transformer, expected, _, out = trained
    folder = peft_saved(tiny, transformer, str(tmp_path / "peft"))
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    config["lora_alpha"] = ALPHA / 2
    json.dump(config, open(os.path.join(folder, "adapter_config.json"), "w"))
    model = fresh(tiny)
    assert load_lora(model, folder, "halved").alpha_source == "adapter_config.json"
    assert not same(output(model), expected)


def test_files_that_are_not_dit_loras_are_refused_by_name(tiny, tmp_path):
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, str(tmp_path / "lokr.safetensors"))
    save_file({"transformer.nothing.weight": torch.zeros(2, 2)}, str(tmp_path / "odd.safetensors"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.bin").write_bytes(b"pickle")
    cases = {"lokr.safetensors": "LyCORIS LoKr", "odd.safetensors": "not LoRA factors", "empty": "a folder without",
             "model.bin": "never pickle", "missing.safetensors": "no such LoRA file"}
    for name, message in cases.items():
        with pytest.raises(LoraError, match=message) as err:
            load_lora(fresh(tiny), str(tmp_path / name), "x")
        assert name in str(err.value)


def test_saved_files_keep_their_keys(trained):
    """The fixtures really are in the layouts they claim (a loader that rewrote them would prove nothing)."""
    _, _, _, out = trained
    assert all(k.startswith("transformer.") for k in load_file(str(out / "ours" / LORA_FILE)))
    assert all(k.startswith("base_model.model.") for k in load_file(str(out / "ours" / PEFT_DIR / "adapter_model.safetensors")))
    saved = load_file(str(out / "diffusers_saved" / LORA_FILE))
    assert saved and not any(k.startswith("transformer.") for k in saved)
    assert any(k.endswith(".alpha") for k in load_file(str(out / "kohya.safetensors")))
    comfy = load_file(str(out / "ours" / COMFYUI_FILE))
    assert all(k.startswith("diffusion_model.") for k in comfy) and any(k.endswith(".lora_A.weight") for k in comfy)
