"""Cache-stage throughput on one GPU: the project's CacheEncoder with full-size encoder configs.

Flux-config AutoencoderKL and a Qwen2.5-VL-7B-config text encoder, random bf16 weights (no weights can be
downloaded here); the tokenizer is the tiny preset's (token ids fit the 152k vocabulary; sequence lengths
match the real layout: vision tokens + 2 + 512). Pairs are 1024x1024 PNGs on local disk fitted to the 768x768
bucket, so the number includes reading, decoding, fitting, encoding edit + reference latents, the prompt
embedding of (instruction, reference at half size) and writing the checksummed entries.

    python -m benchmarks.cache_throughput [--pairs 64] [--batch 1,8,16] [--out results.json]

Also recorded: where the GPU time goes at the largest batch (the VAE with diffusers' SDPA attention and with
the wide-head attention, eager and compiled, and each one's error against the VAE in fp32; the vision tower,
eager and compiled; the language model) and, on the same card, the text encoding as it ran before
(instruction padded to 512 tokens, one SDPA call per vision window), with the largest difference between
the two embeddings (bf16). The tiny tokenizer splits the benchmark's instruction into 37 tokens (Qwen's own
would take ~11), so the language model's share is, if anything, overstated.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
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
    speed_up_encoders,
)
from longcat_ray.model.latents import encode_latents, pixels_to_tensor
from longcat_ray.model.prompt import build_prompt_inputs, encode_prompt_inputs, rope_positions, tokenize_instruction
from longcat_ray.model.vision import pack_vision_attention, speed_up_vision
from longcat_ray.tiny import SPECIAL_TOKENS, build_tiny_tokenizer, draw_reference


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def tiny_components() -> EncoderComponents:
    """The tiny preset's encoders on the CPU: `--size tiny` checks this script end to end without a GPU."""
    from longcat_ray.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    pack_vision_attention(pipe.text_encoder)  # measure_components pads the MLPs after timing them as they are
    return EncoderComponents(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                             image_processor=pipe.text_processor.image_processor)


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
    pack_vision_attention(text_encoder)  # measure_components pads the MLPs after timing them as they are
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


def make_plan(root: Path, batch: int, blank: bool, compile: bool = False) -> CachePlan:
    cache = Path(tempfile.mkdtemp(dir=root))
    return CachePlan(model=str(root / "model"), vae_dirs={"e": str(cache / "e"), "r": str(cache / "r")},
                     text_dir=str(cache / "t"), options={"e": {}, "r": {}, "text": {}}, blank=blank, batch_size=batch,
                     vae_fp="bench", text_fp="bench", compile=compile)


def timed(fn, iters: int = 3) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def timed_compiled(vae, fn, other=None) -> float:
    """`timed` with the VAE encoder compiled as the product does (after `other`, a call of another shape, when
    given); compiled code assumes the weights' layout, so it is dropped after."""
    vae.encoder.compile()
    try:
        if other:
            fn()
            other()
        return timed(fn)
    finally:
        vae.encoder._compiled_call_impl = None
        torch._dynamo.reset()


def measure_vae(vae, vae_call, edit: torch.Tensor, per_pair) -> dict:
    """ms per image of the VAE encoder with diffusers' SDPA attention and with the wide-head attention, eager
    and compiled; each one's error against the encoder in fp32 on the first 4 images."""
    import copy

    from longcat_ray.model.vae_attention import use_wide_head_attention

    out, latents = {}, {}
    reference = copy.deepcopy(vae).float()
    first = lambda: encode_latents(vae, pixels_to_tensor(edit[:4])).float()  # noqa: E731
    truth = encode_latents(reference, pixels_to_tensor(edit[:4]).float()).float()
    del reference
    processor = vae.encoder.mid_block.attentions[0].processor
    for attention in ("sdpa", "wide"):
        if attention == "wide":
            use_wide_head_attention(vae)
        out[f"vae_one_image_ms_{attention}"] = per_pair(timed(vae_call))
        latents[attention] = first()
        if DEVICE == "cuda":
            out[f"vae_one_image_ms_{attention}_compiled"] = per_pair(timed_compiled(vae, vae_call))
            vae.encoder.compile()
            latents[f"{attention}_compiled"] = first()
            vae.encoder._compiled_call_impl = None
            torch._dynamo.reset()
    vae.encoder.mid_block.attentions[0].set_processor(processor)
    if DEVICE == "cuda":
        tail = lambda: encode_latents(vae, pixels_to_tensor(edit[:7, :640, :704]))  # noqa: E731  another bucket and size
        out["vae_one_image_ms_sdpa_compiled_dynamic"] = per_pair(timed_compiled(vae, vae_call, tail))
    for name, z in latents.items():
        out[f"vae_{name}_vs_fp32_max_abs_err"] = round(float((z - truth).abs().max()), 4)
        out[f"vae_{name}_vs_fp32_mean_abs_err"] = round(float((z - truth).abs().mean()), 5)
    out["vae_latent_abs_mean"] = round(float(truth.abs().mean()), 4)
    return out


def prepared_batch(rows: list[dict], batch: int, root: Path) -> dict:
    plan = make_plan(root, batch, False)
    chunk = rows[:batch]
    return prepare_batch({k: [r[k] for r in chunk] for k in chunk[0]}, plan)


def text_before(text_encoder, tokenizer, instructions, pixels, grid) -> torch.Tensor:
    """The text encoding as the pipeline's code runs it on transformers 5.x: 512 instruction slots, 1D
    positions (no position ids given), one SDPA call per vision window."""
    packed = {b: b.attn.__dict__.pop("forward", None) for b in text_encoder.model.visual.blocks}
    tokens = [tokenize_instruction(tokenizer, t) for t in instructions]
    ids, mask, start, suffix = build_prompt_inputs(tokenizer, tokens, int(grid[0].prod()) // 4)
    try:
        out = text_encoder(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), pixel_values=pixels.to(DEVICE),
                           image_grid_thw=grid.to(DEVICE), output_hidden_states=True)
    finally:
        for block, forward in packed.items():
            if forward is not None:
                block.attn.forward = forward
    return out.hidden_states[-1][:, start:-suffix]


@torch.no_grad()
def measure_components(components: EncoderComponents, rows: list[dict], batch: int, root: Path) -> dict:
    """ms per pair of each part of the GPU stage at one batch size, and the before/after text encoding."""
    prepared = prepared_batch(rows, batch, root)
    edit = torch.from_numpy(np.stack(prepared["edit_pixels"])).to(DEVICE)
    pixels = torch.from_numpy(np.concatenate(prepared["vl_pixels"]))
    grid = torch.from_numpy(np.stack(prepared["vl_grid"]))
    te, tok, vae = components.text_encoder, components.tokenizer, components.vae
    captions = list(prepared["caption"])
    per_pair = lambda seconds: round(1000 * seconds / batch, 2)  # noqa: E731
    out = {"batch": batch}
    def vae_call():
        return encode_latents(vae, pixels_to_tensor(edit))

    out.update(measure_vae(vae, vae_call, edit, per_pair))
    tower = lambda: te.model.visual(pixels.to(DEVICE), grid_thw=grid.to(DEVICE)).pooler_output  # noqa: E731
    out["vision_tower_ms"] = per_pair(timed(tower))
    packed = {b: b.attn.__dict__.pop("forward") for b in te.model.visual.blocks}
    stock = tower()
    out["vision_tower_stock_ms"] = per_pair(timed(tower))
    for block, forward in packed.items():
        block.attn.forward = forward
    packed_out = tower()
    out["vision_packed_vs_stock_max_abs_diff"] = round(float((packed_out - stock).abs().max()), 4)
    speed_up_vision(te)  # + MLP width padded, as speed_up_encoders does
    out["vision_tower_mlp_padded_ms"] = per_pair(timed(tower))
    padded = tower()
    out["vision_mlp_padded_vs_not_max_abs_diff"] = round(float((padded - packed_out).abs().max()), 4)
    if DEVICE == "cuda":
        for block in te.model.visual.blocks:
            block.compile(dynamic=True)  # as speed_up_encoders does
        out["vision_tower_compiled_ms"] = per_pair(timed(tower))
        out["vision_compiled_vs_eager_max_abs_diff"] = round(float((tower() - padded).abs().max()), 4)
        for block in te.model.visual.blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    after = lambda: encode_prompt_inputs(te, tok, captions, pixels, grid, 2)  # noqa: E731
    out["text_ms"] = per_pair(timed(after))
    before = lambda: text_before(te, tok, captions, pixels, grid)  # noqa: E731
    out["text_before_ms"] = per_pair(timed(before))
    with_blank = lambda: encode_prompt_inputs(te, tok, captions, pixels, grid, 2, blank=True)  # noqa: E731
    out["text_with_blank_ms"] = per_pair(timed(with_blank))
    # the same positions, all 512 slots and the suffix, LM head included: the compact encoding's bf16 difference
    tokens = [tokenize_instruction(tok, t) for t in captions]
    ids, mask, start, suffix = build_prompt_inputs(tok, tokens, int(grid[0].prod()) // 4)
    positions = rope_positions(ids, mask, te.config.image_token_id, grid, 2)
    full = te(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), position_ids=positions.to(DEVICE),
              pixel_values=pixels.to(DEVICE), image_grid_thw=grid.to(DEVICE), output_hidden_states=True).hidden_states[-1][:, start:-suffix]
    compact = after()[0]
    out["compact_vs_full_max_abs_diff"] = round(float((compact - full).abs().max()), 4)
    out["compact_vs_full_mean_abs_diff"] = round(float((compact - full).abs().float().mean()), 5)
    # bf16's own noise for scale: the first pair encoded alone vs in the batch, both as the product encodes
    single = encode_prompt_inputs(te, tok, captions[:1], pixels[: int(grid[0].prod())], grid[:1], 2)[0]
    out["single_vs_batched_max_abs_diff"] = round(float((single - compact[:1]).abs().max()), 4)
    out["single_vs_batched_mean_abs_diff"] = round(float((single - compact[:1]).abs().float().mean()), 5)
    out["embedding_abs_mean"] = round(float(full.abs().float().mean()), 4)
    return out


def profile_components(components: EncoderComponents, rows: list[dict], batch: int, root: Path) -> dict:
    """Top CUDA-time ops of the vision tower and of the VAE encoder at one batch (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    prepared = prepared_batch(rows, batch, root)
    pixels = torch.from_numpy(np.concatenate(prepared["vl_pixels"])).to(DEVICE)
    grid = torch.from_numpy(np.stack(prepared["vl_grid"])).to(DEVICE)
    edit = pixels_to_tensor(torch.from_numpy(np.stack(prepared["edit_pixels"])).to(DEVICE))
    te, vae = components.text_encoder, components.vae
    out = {}
    for name, fn in (("vision", lambda: te.model.visual(pixels, grid_thw=grid)), ("vae", lambda: encode_latents(vae, edit))):
        with torch.no_grad():
            fn()
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
        table = prof.key_averages().table(sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=15)
        print(f"== {name}\n{table}", flush=True)
        out[name] = table
    return out


def measure_pipeline(rows: list[dict], batch: int, blank: bool, root: Path, compile: bool, factory) -> tuple[float, float, float]:
    """-> (pairs/s of the whole Ray Data pipeline (prepare on CPU tasks -> encode on the GPU actor -> write) from
    the first finished batch to the last (actor start-up excluded); pairs/s from the median time between two
    batches (the steady rate: the last batches tend to arrive together); MiB written per pair)."""
    stamps, written, plan = [], 0, make_plan(root, batch, blank, compile)
    todo = [{**r, "urls": json.dumps(entry_urls(r, plan)), "missing": json.dumps(list(ENTRY_KINDS[: 4 if blank else 3])),
             "valid_bytes": 0} for r in rows]
    for out in encode_dataset(todo, plan, factory=factory).iter_batches(batch_size=None):
        stamps.append((time.perf_counter(), len(out["sample_id"])))
        written += int(sum(out["bytes_written"]))
    rate = sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])
    steady = batch / float(np.median(np.diff([t for t, _ in stamps])))
    print(json.dumps({"pipeline_batches": [[round(t - stamps[0][0], 1), n] for t, n in stamps]}), flush=True)
    return rate, steady, written / len(rows) / 2**20


def measure_gpu_stage(components: EncoderComponents, rows: list[dict], batch: int, blank: bool, root: Path,
                      compile: bool = False) -> tuple[float, float]:
    """-> (pairs/s, seconds of the first call: warm-up and compiling) of the encoder actor's work alone, on rows
    already prepared (the GPU-bound ceiling), with two calls at once on two threads as in the pipeline."""
    plan = make_plan(root, batch, blank, compile)
    as_batch = lambda chunk: {k: [r[k] for r in chunk] for k in chunk[0]}  # noqa: E731
    missing = json.dumps(list(ENTRY_KINDS[: 4 if blank else 3]))
    chunks = [as_batch([{**r, "urls": json.dumps(entry_urls(r, plan)), "missing": missing, "valid_bytes": 0}
                        for r in rows[i : i + batch]]) for i in range(0, len(rows), batch)]
    prepared = [prepare_batch(c, plan) for c in chunks]
    encoder = CacheEncoder(plan, factory=lambda: components, compile=compile)
    start = time.perf_counter()
    encoder(prepared[0])
    sync()
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # two calls at once, as encoded_rows has Ray run them
        list(pool.map(encoder, prepared * 2))  # twice over: filling and draining the two threads count less
    sync()
    return 2 * len(rows) / (time.perf_counter() - start), first_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", default="1,8,16")
    parser.add_argument("--compile", default="0,1", help="GPU-stage rows without (0) and with (1) cache_compile")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: the tiny preset on the CPU (a smoke run)")
    parser.add_argument("--skip-components", action="store_true", help="only the GPU-stage and pipeline rows")
    parser.add_argument("--profile", action="store_true", help="print the top ops of the vision tower and the VAE, then stop")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cache_throughput.json"))
    args = parser.parse_args()
    import ray

    root = Path(tempfile.mkdtemp())
    rows = write_pairs(root, args.pairs)
    write_processor(root / "model")
    batches = [int(b) for b in args.batch.split(",")]
    compiles = [bool(int(c)) for c in args.compile.split(",")]
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results = {"card": card, "size": args.size, "pairs": args.pairs, "resolution": "768x768"}
    factory = full_size_components if args.size == "full" else tiny_components
    components = factory()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.profile:
        Path(args.out).write_text(json.dumps(profile_components(components, rows, max(batches), root), indent=2))
        return
    if not args.skip_components:
        results["components"] = measure_components(components, rows, max(batches), root)
        print(json.dumps(results["components"]), flush=True)
    speed_up_encoders(components)
    for compile in compiles:
        for batch in batches:
            for blank in (False, True):
                rate, first_call = measure_gpu_stage(components, rows, batch, blank, root, compile)
                name = f"gpu_stage_b{batch}_{'with' if blank else 'no'}_blank{'_compiled' if compile else ''}_pairs_per_s"
                results[name] = round(rate, 2)
                results[name.replace("_pairs_per_s", "_first_call_s")] = round(first_call, 1)
                print(json.dumps({name: results[name]}), flush=True)
    if DEVICE == "cuda":
        results["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        del components
        torch.cuda.empty_cache()
    ray.init(num_gpus=1 if DEVICE == "cuda" else 0, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    batch = max(batches)
    for blank in (False, True):
        copies = [{**r, "sample_id": f"{r['sample_id']}-{k}", "edit_sha": f"{r['edit_sha']}{k}"} for k in range(4) for r in rows]
        rate, steady, mib = measure_pipeline(copies, batch, blank, root, compiles[-1], factory)
        name = f"pipeline_b{batch}_{'with' if blank else 'no'}_blank{'_compiled' if compiles[-1] else ''}"
        results[f"{name}_pairs_per_s"], results[f"{name}_steady_pairs_per_s"] = round(rate, 2), round(steady, 2)
        results[f"{name}_mib_written_per_pair"] = round(mib, 2)
        print(json.dumps({name: [results[f"{name}_pairs_per_s"], results[f"{name}_steady_pairs_per_s"], round(mib, 2)]}), flush=True)
    print(json.dumps(results))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
