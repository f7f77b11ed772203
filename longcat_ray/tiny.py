"""The tiny LongCat-Image-Edit preset: a random-init pipeline, a synthetic paired dataset, a config.

No machine of this project can download weights, so the demo, the tests and the docs run on a pipeline
built here: the same classes as the real model (so every code path is shared), with layer counts and
widths small enough that a 2-step edit takes seconds on a CPU. The dataset's edit is a fixed, learnable
function of the reference (red and blue channels swapped) so that a LoRA can measurably learn it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_INSTRUCTIONS = (
    "swap the red and blue colours",
    "exchange the red and blue channels",
    "make the reds blue and the blues red",
)
# (width, height) of the synthetic images: mixed aspect ratios around the tiny resolution.
TINY_SIZES = ((160, 160), (224, 144), (144, 224), (192, 128), (128, 192))
TINY_RESOLUTION = 128
TEXT_HIDDEN = 64


@dataclass(kw_only=True)
class TinyPaths:
    """Where `make_tiny` wrote each part."""

    root: Path
    model: Path
    edits: Path
    refs: Path
    config: Path
    backend: Path


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer and special tokens, trained in-process."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from longcat_ray.model.prompt import SYSTEM_PREFIX, SYSTEM_SUFFIX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [SYSTEM_PREFIX, SYSTEM_SUFFIX, *TINY_INSTRUCTIONS] * 4
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def build_tiny_processor(tokenizer):
    """Qwen2VLProcessor around the tiny tokenizer (the video processor is required by its constructor)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
    )


def build_tiny_text_encoder(tokenizer, seed: int, hidden: int = TEXT_HIDDEN):
    """A 2-layer Qwen2.5-VL whose image/video/vision token ids point at the tiny tokenizer's specials.
    `hidden`: the embedding width (3584 for prompt embeddings shaped like the real encoder's)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=hidden // 16,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        out_hidden_size=hidden,
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_vae(seed: int):
    """A Flux-style AutoencoderKL: 16 latent channels, 8x down-sampling, Flux's scale and shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def build_tiny_transformer(seed: int):
    """A 1 double + 1 single block LongCatImageTransformer2DModel (real: 10 + 20, 24 heads x 128)."""
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(seed)
    return LongCatImageTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=[4, 6, 6],
    ).eval()


def build_tiny_scheduler():
    """The real model's scheduler settings: dynamic (resolution-dependent) exponential shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def build_tiny_pipeline(seed: int = 0):
    """The whole tiny LongCatImageEditPipeline, deterministic for a seed."""
    from diffusers import LongCatImageEditPipeline

    tokenizer = build_tiny_tokenizer()
    return LongCatImageEditPipeline(
        scheduler=build_tiny_scheduler(),
        vae=build_tiny_vae(seed + 1),
        text_encoder=build_tiny_text_encoder(tokenizer, seed + 2),
        tokenizer=tokenizer,
        text_processor=build_tiny_processor(tokenizer),
        transformer=build_tiny_transformer(seed + 3),
    )


def draw_reference(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A smooth random scene: a two-colour gradient with a few soft shapes on it."""
    width, height = size
    top = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp) * np.ones((1, width, 1), dtype=np.float32)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 4)):
        x0, y0 = rng.randrange(width - 16), rng.randrange(height - 16)
        x1, y1 = x0 + rng.randint(16, width // 2), y0 + rng.randint(16, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def apply_tiny_edit(reference: Image.Image) -> Image.Image:
    """The learnable edit of the synthetic data: red and blue channels swapped."""
    red, green, blue = reference.split()
    return Image.merge("RGB", (blue, green, red))


def write_tiny_dataset(edits: Path, refs: Path, pairs: int, seed: int, sizes=TINY_SIZES) -> None:
    """`pairs` reference/edit PNGs with matching stems, cycling through `sizes`; the instruction sits beside the
    edit as `.txt`."""
    edits.mkdir(parents=True, exist_ok=True)
    refs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(pairs):
        stem = f"pair_{index:04d}"
        reference = draw_reference(sizes[index % len(sizes)], rng)
        reference.save(refs / f"{stem}.png")
        apply_tiny_edit(reference).save(edits / f"{stem}.png")
        (edits / f"{stem}.txt").write_text(TINY_INSTRUCTIONS[index % len(TINY_INSTRUCTIONS)] + "\n")


def tiny_config(root: Path) -> tuple[dict, list[dict]]:
    """SimpleTuner-format `config.json` and `multidatabackend.json` contents for the tiny preset."""
    config = {
        "--model_type": "lora",
        "--model_family": "longcat_image",
        "--model_flavour": "edit",
        "--pretrained_model_name_or_path": str(root / "model"),
        "--base_model_precision": "no_change",
        "--data_backend_config": str(root / "config" / "multidatabackend.json"),
        "--output_dir": str(root / "output"),
        "--seed": 42,
        "--train_batch_size": 2,
        "--gradient_checkpointing": "true",
        "--learning_rate": "1e-2",
        "--lora_rank": 4,
        "--lora_alpha": 4,
        "--max_train_steps": 30,
        "--checkpointing_steps": 10,
        "--resume_from_checkpoint": "latest",
        "--caption_dropout_probability": 0.1,
        "--aspect_bucket_alignment": 64,
        "--validation_guidance": 4.5,
        "--validation_num_inference_steps": 4,
        "--validation_resolution": f"{TINY_RESOLUTION}x{TINY_RESOLUTION}",
        "--validation_steps": 15,
        "--mixed_precision": "no",
    }
    backend = [
        {
            "id": "edit-images",
            "type": "local",
            "instance_data_dir": str(root / "data" / "edits"),
            "caption_strategy": "textfile",
            "resolution": TINY_RESOLUTION,
            "resolution_type": "pixel_area",
            "cache_dir_vae": str(root / "cache" / "vae" / "edit"),
            "conditioning_data": ["ref-images"],
        },
        {
            "id": "ref-images",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(root / "data" / "refs"),
            "caption_strategy": None,
            "resolution": TINY_RESOLUTION,
            "resolution_type": "pixel_area",
            "cache_dir_vae": str(root / "cache" / "vae" / "ref"),
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(root / "cache" / "text"),
        },
    ]
    return config, backend


def make_tiny(out: Path, pairs: int = 12, seed: int = 0) -> TinyPaths:
    """Write the tiny model, the synthetic dataset and a ready SimpleTuner config under `out`."""
    root = Path(out).resolve()
    paths = TinyPaths(
        root=root,
        model=root / "model",
        edits=root / "data" / "edits",
        refs=root / "data" / "refs",
        config=root / "config" / "config.json",
        backend=root / "config" / "multidatabackend.json",
    )
    build_tiny_pipeline(seed).save_pretrained(paths.model)
    write_tiny_dataset(paths.edits, paths.refs, pairs, seed)
    config, backend = tiny_config(root)
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(json.dumps(config, indent=2) + "\n")
    paths.backend.write_text(json.dumps(backend, indent=2) + "\n")
    return paths
