"""Edit latency of the serving path: a 40-step CFG edit at 768x768, full-size LongCat-Image-Edit configs with
random bf16 weights (DiT 6.3B, Qwen2.5-VL-7B text encoder, Flux VAE), one GPU.

In-process rows (same model, same run): the pipeline's math as diffusers runs it (eager, two forwards per CFG
step) and the serving levers of `longcat_ray.inference` one by one (CFG in one batch-2 forward, cuDNN
attention, regional torch.compile, fp8 matmuls). The whole edit is timed: VL prompt encoding of (instruction,
reference) and of the negative, VAE encode, 40 steps, VAE decode. `--serve` adds end-to-end HTTP rows through
the real Ray Serve app (`longcat_ray.serving.app`) on 127.0.0.1: one request at a time, and 8 at once.

    python -m benchmarks.serve_latency [--variants eager_two_calls,eager,compiled,fp8_compiled] [--serve fp8_compiled]
    python -m benchmarks.serve_latency --variants eager,fp8_compiled,fp8ao_compiled   # fp8: the product's vs torchao's
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import tempfile
import time

import torch
from PIL import Image

from longcat_ray.inference import EditRequest, decode_images, denoise, encode_condition, speed_up

VARIANTS = {  # name -> (cfg_batch, cudnn attention, compile, quantize)
    "eager_two_calls": (False, False, False, "none"),
    "eager": (True, True, False, "none"),
    "compiled": (True, True, True, "none"),
    "fp8": (True, True, False, "fp8"),
    "fp8_compiled": (True, True, True, "fp8"),
    "fp8fast_compiled": (True, True, True, "fp8-fast"),  # the same with the tensor cores' fast accumulation
    # what `quantize: fp8` ran before: torchao's dynamic per-row float8 (kept here only to compare with)
    "fp8ao_compiled": (True, True, True, "fp8-torchao"),
}


def full_pipeline():
    """LongCatImageEditPipeline with the real component configs and random bf16 weights, on the GPU."""
    from diffusers import LongCatImageEditPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from benchmarks.cache_throughput import full_size_components
    from benchmarks.train_step import build_transformer
    from longcat_ray.tiny import build_tiny_scheduler

    parts = full_size_components()
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=parts.tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    transformer = build_transformer("full", torch.device("cuda"), torch.bfloat16)
    pipe = LongCatImageEditPipeline(scheduler=build_tiny_scheduler(), vae=parts.vae, text_encoder=parts.text_encoder,
                                    tokenizer=parts.tokenizer, text_processor=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline():
    """CPU smoke run of this script (`--size tiny`)."""
    from longcat_ray.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_edit(pipe, reference: Image.Image, request: EditRequest, cfg_batch: bool) -> tuple[float, torch.Tensor]:
    """-> (seconds for the whole edit, the final latents)."""
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        ref, embeds, negative = encode_condition(pipe, [reference], [request])
        latents = denoise(pipe.transformer, ref, embeds, negative, [request], cfg_batch=cfg_batch)
        decode_images(pipe.vae, latents, request.width, request.height)
    sync()
    return time.perf_counter() - start, latents.float()


def torchao_fp8(transformer) -> None:
    """The previous `quantize: fp8`: torchao's dynamic per-row float8 on every linear whose dims fit."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def fits(module: torch.nn.Module, _name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fits)


def apply_levers(pipe, quantize: str, compile: bool) -> None:
    """speed_up, or the torchao comparison row's quantization followed by speed_up's compile (GPU only, as
    speed_up)."""
    if quantize == "fp8-torchao":
        if torch.cuda.is_available():
            torchao_fp8(pipe.transformer)
        quantize = "none"
    speed_up(pipe, quantize, compile)


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else 0.0


def run_variants(pipe, names: list[str], iters: int, side: int) -> dict:
    """Each row's levers on the pipeline; quantizations cannot be undone, so a row that quantizes differently from
    the one before starts from a copy of the untouched DiT (and a fresh compile). Each row reports its final
    latents' relative difference from the first row's (same seed): what the levers change in the result."""
    import copy

    reference = Image.effect_noise((1024, 1024), 64).convert("RGB")
    request = EditRequest(prompt="make the sky a sunset", width=side, height=side, steps=40, guidance=4.5, seed=0)
    kinds = {VARIANTS[name][3] for name in names} - {"none"}
    pristine = copy.deepcopy(pipe.transformer) if len(kinds) > 1 else None
    results, quantized, compiled, first = {}, "none", False, None
    for name in names:  # ordered so that levers only accumulate (quantize and compile cannot be undone)
        cfg_batch, cudnn, compile, quantize = VARIANTS[name]
        if quantized != "none" and quantize not in ("none", quantized):
            pipe.transformer = copy.deepcopy(pristine)
            torch._dynamo.reset()
            quantized, compiled = "none", False
        if torch.cuda.is_available():
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        if (quantize != "none" and quantized == "none") or (compile and not compiled):
            apply_levers(pipe, quantize if quantized == "none" else "none", compile and not compiled)
            quantized, compiled = quantize if quantized == "none" else quantized, compiled or compile
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        warm, latents = timed_edit(pipe, reference, request, cfg_batch)  # includes compilation for compiled rows
        runs = [timed_edit(pipe, reference, request, cfg_batch) for _ in range(iters)]
        times = [t for t, _ in runs]
        first = latents if first is None else first
        results[name] = {"s_per_edit": round(statistics.median(times), 3), "all_s": [round(t, 3) for t in times],
                         "first_call_s": round(warm, 1), "setup_and_first_s": round(time.perf_counter() - start - sum(times), 1),
                         "graphs_compiled": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
                         "latents_rel_diff_vs_first_row": round(((latents - first).norm() / first.norm()).item(), 4),
                         "peak_gib": peak_gib()}
        print(name, json.dumps(results[name]), flush=True)
    return results


def run_serve(model_dir: str, variant: str, side: int, concurrent: int) -> dict:
    """Deploy the Serve app over the saved pipeline with the variant's levers, time HTTP edits."""
    import requests
    from ray import serve

    from longcat_ray.runtime import init_ray
    from longcat_ray.serving.app import APP_NAME, build_app
    from longcat_ray.serving.config import ServeConfig

    _, _, compile, quantize = VARIANTS[variant]
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    config = ServeConfig(model=model_dir, quantize=quantize, compile=compile, max_batch_size=4)
    start = time.perf_counter()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    deployed = time.perf_counter() - start
    buffer = io.BytesIO()
    Image.effect_noise((1024, 1024), 64).convert("RGB").save(buffer, format="PNG")

    model_seconds = []

    def post(seed: int) -> float:
        begin = time.perf_counter()
        response = requests.post("http://127.0.0.1:8000/v1/edit", files={"image": ("ref.png", buffer.getvalue())},
                                 data={"prompt": "make the sky a sunset", "width": str(side), "height": str(side),
                                       "num_inference_steps": "40", "guidance_scale": "4.5", "seed": str(seed)}, timeout=900)
        response.raise_for_status()
        model_seconds.append(float(response.headers["X-Edit-Seconds"]))
        return time.perf_counter() - begin

    first = post(0)
    single = [post(i) for i in range(1, 4)]
    result = {"variant": variant, "deploy_s": round(deployed, 1), "first_request_s": round(first, 1),
              "s_per_request": round(statistics.median(single), 3), "all_s": [round(t, 3) for t in single],
              "model_s_per_request": round(statistics.median(model_seconds[1:4]), 3)}
    print("serve", json.dumps(result), flush=True)
    if concurrent:
        from concurrent.futures import ThreadPoolExecutor

        begin = time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            latencies = list(pool.map(post, range(10, 10 + concurrent)))
        wall = time.perf_counter() - begin
        result.update({"concurrent": concurrent, "concurrent_wall_s": round(wall, 2),
                       "concurrent_images_per_s": round(concurrent / wall, 3),
                       "concurrent_median_latency_s": round(statistics.median(latencies), 2)})
    serve.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="eager_two_calls,eager,compiled,fp8_compiled")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--serve", default="", help="also time HTTP edits through Ray Serve with this variant's levers")
    parser.add_argument("--concurrent", type=int, default=8, help="with --serve: then this many requests at once")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "serve_latency.json"))
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a CPU smoke run")
    args = parser.parse_args()
    side = 768 if args.size == "full" else 64
    pipe = full_pipeline() if args.size == "full" else tiny_pipeline()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"device": device, "date": time.strftime("%Y-%m-%d"), "size": args.size}
    with tempfile.TemporaryDirectory() as root:
        model_dir = os.path.join(root, "pipeline")
        if args.serve:  # saved before any lever changes the in-memory weights
            start = time.perf_counter()
            pipe.save_pretrained(model_dir)
            results["save_s"] = round(time.perf_counter() - start, 1)
        results["variants"] = run_variants(pipe, [n for n in args.variants.split(",") if n], args.iters, side)
        json.dump(results, open(args.out, "w"), indent=2)
        if args.serve:
            del pipe
            gc.collect()
            torch.cuda.empty_cache()
            results["serve"] = run_serve(model_dir, args.serve, side, args.concurrent)
            print("serve", json.dumps(results["serve"]), flush=True)
    json.dump(results, open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
