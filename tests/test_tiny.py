"""The tiny preset: a loadable, deterministic pipeline and a learnable paired dataset."""

import json

import numpy as np
import torch
from diffusers import LongCatImageEditPipeline
from PIL import Image

from longcat_ray.tiny import SPECIAL_TOKENS, build_tiny_pipeline


def test_pipeline_loads_with_diffusers(tiny, tiny_pipe):
    assert isinstance(tiny_pipe, LongCatImageEditPipeline)
    tok = tiny_pipe.tokenizer
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert tok.unk_token_id not in ids[1:] and len(set(ids)) == len(ids)
    cfg = tiny_pipe.text_encoder.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tiny_pipe.vae.config.latent_channels == 16 and tiny_pipe.vae_scale_factor == 8
    assert tiny_pipe.transformer.config.joint_attention_dim == cfg.text_config.hidden_size
    size = sum(f.stat().st_size for f in tiny.model.rglob("*") if f.is_file())
    assert size < 5e6


def test_pipeline_is_deterministic_for_a_seed():
    a, b, c = build_tiny_pipeline(3), build_tiny_pipeline(3), build_tiny_pipeline(4)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].dtype.is_floating_point)


def test_dataset_pairs_are_matched_captioned_and_learnable(tiny):
    edits = sorted(p.stem for p in tiny.edits.glob("*.png"))
    refs = sorted(p.stem for p in tiny.refs.glob("*.png"))
    assert edits == refs and len(edits) == 8
    sizes = set()
    for stem in edits:
        ref = np.asarray(Image.open(tiny.refs / f"{stem}.png"))
        edit = np.asarray(Image.open(tiny.edits / f"{stem}.png"))
        assert np.array_equal(edit, ref[..., ::-1])  # red and blue swapped
        assert (tiny.edits / f"{stem}.txt").read_text().strip()
        sizes.add(ref.shape[1] / ref.shape[0])
    assert len(sizes) >= 3  # mixed aspect ratios


def test_config_points_at_the_data(tiny):
    config = json.loads(tiny.config.read_text())
    backend = json.loads(tiny.backend.read_text())
    assert config["--pretrained_model_name_or_path"] == str(tiny.model)
    assert backend[0]["instance_data_dir"] == str(tiny.edits)
    assert backend[0]["conditioning_data"] == [backend[1]["id"]]
