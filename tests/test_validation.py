"""`longcat-ray validate`: explicit sizes, LoRAs that change the result, grids per pair, clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from longcat_ray.cli import main
from longcat_ray.config import LoraConfig
from longcat_ray.export import export_lora
from longcat_ray.model.transformer import add_lora
from longcat_ray.tiny import build_tiny_transformer


def random_lora(out, seed=0, **transformer_overrides):
    """A LoRA exported by the project's exporter, with non-zero B so that it changes the output."""
    transformer = build_tiny_transformer(0)
    if transformer_overrides:
        from diffusers import LongCatImageTransformer2DModel

        transformer = LongCatImageTransformer2DModel(**{**transformer.config, **transformer_overrides})
    add_lora(transformer, LoraConfig(rank=4, alpha=8), seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    export_lora(transformer, str(out), {}, {"base_model": "tiny", "rank": 4, "alpha": 8})
    return out


def run_validate(tiny, out, *extra):
    args = ["validate", "--model_family", "longcat_image", "--model_flavour", "edit", "--validation_guidance", "4.5",
            "--validation_num_inference_steps", "2", "--pretrained_model_name_or_path", str(tiny.model),
            "--image", str(tiny.refs / "pair_0001.png"), "--prompt", "swap the red and blue colours", "--output", str(out), *extra]
    return main(args)


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.float32)


def test_explicit_size_and_loras_change_the_result(tiny, tmp_path):
    assert run_validate(tiny, tmp_path / "base.png", "--validation_resolution", "768x768") == 0
    assert Image.open(tmp_path / "base.png").size == (768, 768)
    lora = random_lora(tmp_path / "lora")
    assert run_validate(tiny, tmp_path / "lora.png", "--validation_resolution", "768x768", "--lora", str(lora)) == 0
    assert np.abs(pixels(tmp_path / "lora.png") - pixels(tmp_path / "base.png")).mean() > 1.0
    # a scale of 0 is the base model again
    assert run_validate(tiny, tmp_path / "zero.png", "--validation_resolution", "768x768", "--lora", f"{lora}:0") == 0
    assert np.abs(pixels(tmp_path / "zero.png") - pixels(tmp_path / "base.png")).max() <= 1.0


def test_config_writes_a_grid_per_validation_pair(tiny, tmp_path, capsys):
    code = main(["validate", "--config", str(tiny.config), "--validation_resolution", "128x96",
                 "--validation_num_inference_steps", "2", "--lora", str(random_lora(tmp_path / "l")), "--output", str(tmp_path / "v")])
    assert code == 0
    grids = sorted((tmp_path / "v").glob("*.png"))
    assert len(grids) == 4 and all(Image.open(g).size == (3 * round(128 * 256 / 96), 256) for g in grids)


def test_errors_name_the_problem(tiny, tmp_path, capsys):
    assert run_validate(tiny, tmp_path / "x.png", "--validation_resolution", "770x768") == 2
    assert "nearest valid: 768x768" in capsys.readouterr().err
    other = random_lora(tmp_path / "other", attention_head_dim=8, axes_dims_rope=[2, 3, 3])
    assert run_validate(tiny, tmp_path / "x.png", "--validation_resolution", "128x128", "--lora", str(other)) == 2
    err = capsys.readouterr().err
    assert "does not fit this base model" in err and "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in err
    (tmp_path / "evil.bin").write_bytes(b"not safetensors")
    assert run_validate(tiny, tmp_path / "x.png", "--lora", str(tmp_path / "evil.bin")) == 2
    assert "safetensors only" in capsys.readouterr().err
    assert main(["validate", "--model_family", "flux", "--config", str(tiny.config)]) == 2
