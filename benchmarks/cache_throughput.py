"""Cache-stage throughput on one GPU: the project's CacheEncoder with full-size encoder configs.

Flux-config AutoencoderKL and a Qwen2.5-VL-7B-config text encoder, random bf16 weights (no weights can be
downloaded here); the tokenizer is the tiny preset's (token ids fit the 152k vocabulary; sequence lengths
match the real layout: vision tokens + 2 + 512). Pairs are 1024x1024 PNGs on local disk fitted to the 768x768
bucket, so the number includes reading, decoding, fitting, encoding edit + reference latents, the prompt
embedding of (instruction, reference at half size) and writing the checksummed entries.

    python benchmarks/cache_throughput.py [--pairs 64] [--batch 1,8,16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from longcat_ray.cache import (
    ENTRY_KINDS,
    CacheEncoder,
    CachePlan,
    EncoderComponents,
    encode_dataset,
    entry_urls,
    prepare_batch,
)
from longcat_ray.tiny import SPECIAL_TOKENS, build_tiny_tokenizer, draw_reference


def full_size_components() -> EncoderComponents:
    from diffusers import AutoencoderKL
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
            latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
            use_post_quant_conv=False,
        ).to(torch.bfloat16).eval()
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16).eval()
    return EncoderComponents(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, image_processor=Qwen2VLImageProcessor())


def write_processor(folder: Path) -> None:
    """The pipeline folder's text_processor/ (the prepare stage loads the VL image processor from it)."""
    from longcat_ray.tiny import build_tiny_processor

    build_tiny_processor(build_tiny_tokenizer()).save_pretrained(folder / "text_processor")


def write_pairs(root: Path, count: int) -> list[dict]:
    import hashlib
    import random

    rng = random.Random(0)
    rows = []
    for i in range(count):
        ref = draw_reference((1024, 1024), rng)
        for kind, image in (("ref", ref), ("edit", ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
            (root / kind).mkdir(parents=True, exist_ok=True)
            image.save(root / kind / f"{i:05d}.png")
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        rows.append(dict(sample_id=f"e/{i:05d}", dataset_id="e", ref_dataset_id="r",
                         edit_url=str(root / "edit" / f"{i:05d}.png"), ref_url=str(root / "ref" / f"{i:05d}.png"),
                         caption="replace the sky with a sunset and keep everything else", bucket_w=768, bucket_h=768,
                         edit_sha=digest, ref_sha=digest))
    return rows


def make_plan(root: Path, batch: int, blank: bool) -> CachePlan:
    cache = Path(tempfile.mkdtemp(dir=root))
    return CachePlan(model=str(root / "model"), vae_dirs={"e": str(cache / "e"), "r": str(cache / "r")},
                     text_dir=str(cache / "t"), options={"e": {}, "r": {}, "text": {}}, blank=blank, batch_size=batch,
                     vae_fp="bench", text_fp="bench")


def measure_pipeline(rows: list[dict], batch: int, blank: bool, root: Path) -> float:
    """pairs/s of the whole Ray Data pipeline (prepare on CPU tasks -> encode on the GPU actor -> write),
    in steady state: from the first finished batch to the last (actor start-up excluded)."""
    stamps, plan = [], make_plan(root, batch, blank)
    todo = [{**r, "urls": json.dumps(entry_urls(r, plan)), "missing": json.dumps(list(ENTRY_KINDS[: 4 if blank else 3])),
             "valid_bytes": 0} for r in rows]
    for out in encode_dataset(todo, plan, factory=full_size_components).iter_batches(batch_size=None):
        stamps.append((time.perf_counter(), len(out["sample_id"])))
    return sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])


def measure_gpu_stage(components: EncoderComponents, rows: list[dict], batch: int, blank: bool, root: Path) -> float:
    """pairs/s of the encoder actor's work alone, on rows already prepared (the GPU-bound ceiling)."""
    plan = make_plan(root, batch, blank)
    as_batch = lambda chunk: {k: [r[k] for r in chunk] for k in chunk[0]}  # noqa: E731
    missing = json.dumps(list(ENTRY_KINDS[: 4 if blank else 3]))
    chunks = [as_batch([{**r, "urls": json.dumps(entry_urls(r, plan)), "missing": missing, "valid_bytes": 0}
                        for r in rows[i : i + batch]]) for i in range(0, len(rows), batch)]
    prepared = [prepare_batch(c, plan) for c in chunks]
    encoder = CacheEncoder(plan, factory=lambda: components)
    encoder(prepared[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for chunk in prepared:
        encoder(chunk)
    torch.cuda.synchronize()
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", default="1,8,16")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cache_throughput.json"))
    args = parser.parse_args()
    import ray

    torch.backends.cuda.enable_cudnn_sdp(False)
    root = Path(tempfile.mkdtemp())
    rows = write_pairs(root, args.pairs)
    write_processor(root / "model")
    results = {"card": torch.cuda.get_device_name(), "pairs": args.pairs, "resolution": "768x768"}
    components = full_size_components()
    for batch in (int(b) for b in args.batch.split(",")):
        for blank in (False, True):
            rate = measure_gpu_stage(components, rows, batch, blank, root)
            results[f"gpu_stage_b{batch}_{'with' if blank else 'no'}_blank_pairs_per_s"] = round(rate, 2)
            print(json.dumps({"stage": "gpu", "batch": batch, "blank": blank, "pairs_per_s": round(rate, 2)}), flush=True)
    results["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del components
    torch.cuda.empty_cache()
    ray.init(num_gpus=1 if torch.cuda.is_available() else 0, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    batch = int(args.batch.split(",")[-2 if "," in args.batch else 0])
    for blank in (False, True):
        twice = [{**r, "sample_id": f"{r['sample_id']}-{k}", "edit_sha": f"{r['edit_sha']}{k}"} for k in range(2) for r in rows]
        rate = measure_pipeline(twice, batch, blank, root)
        results[f"pipeline_b{batch}_{'with' if blank else 'no'}_blank_pairs_per_s"] = round(rate, 2)
        print(json.dumps({"stage": "pipeline", "batch": batch, "blank": blank, "pairs_per_s": round(rate, 2)}), flush=True)
    print(json.dumps(results))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
