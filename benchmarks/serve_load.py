"""Serving under load (issue 17): the real Ray Serve app (`longcat_ray.serving.app`) on 127.0.0.1, one GPU, a
full-size LongCat-Image-Edit with random bf16 weights (`--size tiny`: the CPU smoke run), 768², 40 steps, CFG.

1. In process: one edit through the replica's own path (`edit_images` after `speed_up`), the reference.
2. Cold start: `serve.run` of the app with `warmup_sizes` = the benchmark size and an empty `compile_cache_dir`
   (ready = warm-up done); then one request alone, then `--concurrency` levels (p50/p95 latency, images/s).
3. LoRA switch: a request for a LoRA already loaded against one for a LoRA the replica has not loaded yet.
4. Warm-cache start: the app shut down and deployed again on a fresh local Ray whose inductor cache is empty (as on
   a new node), over the same `compile_cache_dir`: only that cache can make its compile warm.
5. Batching off (`max_batch_size: 1`, its own cold start) at the highest concurrency, for the ratio.

    python -m benchmarks.serve_load [--compile] [--quantize fp8] [--concurrency 1,4,8] [--size tiny]

Writes $OUT/serve_load_<card>.json with in_process_s_per_edit, http_s_per_edit, batched_vs_unbatched_8,
p95_s_8, lora_switch_s, cold_ready_s, warm_cache_ready_s (+ warm_cache_first_edit_s) and the rows they come from.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.serve_latency import full_pipeline, tiny_pipeline


def make_loras(pipe, root: Path, count: int) -> list[str]:
    """`count` random LoRAs (rank 32 on the official targets, B non-zero) exported as training exports them."""
    from longcat_ray.config import LoraConfig
    from longcat_ray.export import export_lora
    from longcat_ray.model.transformer import add_lora

    ids = []
    for index in range(count):
        add_lora(pipe.transformer, LoraConfig(rank=32), seed=index)
        with torch.no_grad():
            for name, param in pipe.transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
        export_lora(pipe.transformer, str(root / f"lora{index}"), {}, {"base_model": "random"})
        pipe.transformer.unload_lora()  # the plain DiT again, no peft wrappers
        ids.append(f"lora{index}")
    return ids


def timed_edits(pipe, side: int, iters: int) -> tuple[float, Image.Image]:
    """`iters` + 1 edits of one noise source (the first compiles) -> (median seconds of the rest, the last image)."""
    from longcat_ray.inference import EditRequest, edit_images

    reference = Image.effect_noise((1024, 1024), 64).convert("RGB")
    request = EditRequest(prompt="make the sky a sunset", width=side, height=side, steps=40, guidance=4.5, seed=0)
    times = []
    for _ in range(iters + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            image = edit_images(pipe, [reference], [request])[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), image


def in_process(pipe, side: int, quantize: str, compile: bool, fast_accum: bool, result: dict, iters: int = 3) -> None:
    """The replica's own path in this process -> result's in_process_s_per_edit; with `fast_accum` (and fp8) the
    same converted DiT again with the tensor cores' fast fp8 accumulation (a recompile), its seconds and how far its
    image moves from the exact accumulation's (mean |difference| in 0-255 pixel units, same seed)."""
    from longcat_ray.inference import set_fast_accum, speed_up

    speed_up(pipe, quantize, compile)
    seconds, image = timed_edits(pipe, side, iters)
    result["in_process_s_per_edit"] = round(seconds, 3)
    if fast_accum and quantize == "fp8":
        set_fast_accum(pipe.transformer, True)  # the compiled graphs guard on it: they recompile
        seconds, fast = timed_edits(pipe, side, iters)
        set_fast_accum(pipe.transformer, False)
        diff = np.abs(np.asarray(fast, np.float32) - np.asarray(image, np.float32)).mean()
        result.update(in_process_fast_accum_s_per_edit=round(seconds, 3), fast_accum_mean_abs_pixel_diff=round(float(diff), 3))


class Client:
    """HTTP edits against the running app; each call -> seconds from send to the PNG received."""

    def __init__(self, url: str, side: int):
        buffer = io.BytesIO()
        Image.effect_noise((1024, 1024), 64).convert("RGB").save(buffer, format="PNG")
        self.url, self.side, self.source = url, side, buffer.getvalue()
        self.stages: list[dict[str, float]] = []  # Server-Timing of each edit: ms per server stage, "client" the rest

    def edit(self, seed: int, lora: str = "", lora_scale: float = 1.0) -> float:
        import requests

        start = time.perf_counter()
        response = requests.post(f"{self.url}/v1/edit", files={"image": ("ref.png", self.source, "image/png")}, timeout=1800,
                                 data={"prompt": "make the sky a sunset", "width": str(self.side), "height": str(self.side),
                                       "num_inference_steps": "40", "guidance_scale": "4.5", "seed": str(seed), "lora": lora,
                                       "lora_scale": str(lora_scale)})
        response.raise_for_status()
        wall = time.perf_counter() - start
        stages = {k: float(v) for k, v in (item.split(";dur=") for item in response.headers["Server-Timing"].split(", "))}
        self.stages.append({**stages, "client_and_proxy": 1000 * wall - sum(stages.values())})
        return wall

    def stage_medians(self, last: int) -> dict[str, float]:
        """Median milliseconds per stage over the last `last` edits."""
        rows = self.stages[-last:]
        return {name: round(statistics.median(row[name] for row in rows), 1) for name in rows[0]}

    def load(self, concurrent: int, rounds: int) -> dict:
        """`rounds` waves of `concurrent` requests at once -> latency percentiles and images per second."""
        latencies, start = [], time.perf_counter()
        with ThreadPoolExecutor(concurrent) as pool:
            for wave in range(rounds):
                latencies += list(pool.map(self.edit, range(wave * concurrent, (wave + 1) * concurrent)))
        wall = time.perf_counter() - start
        ordered = sorted(latencies)
        return {"concurrent": concurrent, "requests": len(latencies), "images_per_s": round(len(latencies) / wall, 3),
                "p50_s": round(statistics.median(ordered), 3), "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def deploy(config, inductor_dir: Path) -> tuple[str, float]:
    """serve.run of the app on a fresh local Ray whose processes compile into `inductor_dir` (empty: a replica on a
    new node, so only `compile_cache_dir` can make its compile warm) -> (url, seconds until every replica is ready,
    warm-up included)."""
    import ray
    from ray import serve

    from longcat_ray.runtime import init_ray
    from longcat_ray.serving.app import APP_NAME, build_app

    ray.shutdown()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)  # the local Ray's workers inherit it
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    start = time.perf_counter()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return "http://127.0.0.1:8000", round(time.perf_counter() - start, 1)


def unbatched(config, root: Path, side: int, concurrent: int, rounds: int, result: dict, save) -> None:
    """Batching off (`max_batch_size: 1`, its own cold start) at `concurrent` requests at once."""
    from ray import serve

    url, result["unbatched_cold_ready_s"] = deploy(config.model_copy(update={"max_batch_size": 1}), root / "inductor-unbatched")
    result["unbatched"] = [Client(url, side).load(concurrent, rounds)]
    serve.shutdown()
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="compile: true (the replica's warm-up compiles)")
    parser.add_argument("--quantize", default="none", choices=["none", "fp8", "fp8-fast"])
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=2, help="waves of requests per concurrency level")
    parser.add_argument("--size", default="full", choices=["full", "tiny"], help="tiny: a CPU smoke run")
    parser.add_argument("--fast-accum", action="store_true",
                        help="with --quantize fp8: also time the in-process edit with fp8 fast accumulation")
    parser.add_argument("--warmup-lora", action="store_true", help="warmup_lora: the first adapter (lora_first_s then "
                        "shows whether a first adapter still compiles)")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the max_batch_size 1 deployment")
    parser.add_argument("--only-unbatched", action="store_true",
                        help="only the max_batch_size 1 deployment (when one device call cannot hold every phase)")
    args = parser.parse_args()
    from ray import serve

    from longcat_ray.serving.config import ServeConfig

    side, levels = (768, [int(c) for c in args.concurrency.split(",")]) if args.size == "full" else (64, [1, 2])
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = Path(os.environ.get("OUT", ".")) / f"serve_load_{card.split()[-1].lower()}.json"
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "size": args.size, "compile": args.compile,
              "quantize": args.quantize, "side": side}

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        pipe = full_pipeline() if args.size == "full" else tiny_pipeline()
        pipe.save_pretrained(root / "pipeline")  # before any adapter or lever changes the model in memory
        loras = make_loras(pipe, root / "loras", 2)
        config = ServeConfig(model=str(root / "pipeline"), lora_root=str(root / "loras"), quantize=args.quantize,
                             compile=args.compile, compile_cache_dir=str(root / "compiled"), warmup_sizes=[f"{side}x{side}"],
                             max_batch_size=max(levels), max_loras_per_replica=1, default_steps=40,
                             warmup_lora=loras[0] if args.warmup_lora else None)
        if args.only_unbatched:
            del pipe
            return unbatched(config, root, side, max(levels), args.rounds, result, save)
        in_process(pipe, side, args.quantize, args.compile, args.fast_accum, result)
        del pipe
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()
        url, result["cold_ready_s"] = deploy(config, root / "inductor-cold")
        client = Client(url, side)
        client.edit(0)
        result["http_s_per_edit"] = round(statistics.median(client.edit(i) for i in range(1, 4)), 3)
        result["http_stages_ms"] = client.stage_medians(3)  # the same three requests
        result["replica_model_s_per_edit"] = round(result["http_stages_ms"]["model"] / 1000, 3)
        result["batched"] = [client.load(c, args.rounds) for c in levels]
        save()
        result["lora_first_s"] = round(client.edit(0, loras[0]), 3)  # the replica's first adapter: its slot compiles
        result["lora_first_stages_ms"] = client.stage_medians(1)
        loaded = statistics.median(client.edit(i, loras[0]) for i in range(3))
        switched = statistics.median(client.edit(i, loras[i % 2]) for i in range(1, 4))  # one slot: each one reloads
        result.update(lora_loaded_s=round(loaded, 3), lora_switched_s=round(switched, 3), lora_switch_s=round(switched - loaded, 3),
                      lora_switched_stages_ms=client.stage_medians(3))  # the adapter's load is in "wait"
        result["lora_new_scale_s"] = round(client.edit(0, loras[1], lora_scale=0.6), 3)  # a strength not used before
        result["base_after_lora_s"] = round(client.edit(0), 3)
        save()
        serve.shutdown()
        url, result["warm_cache_ready_s"] = deploy(config, root / "inductor-new-node")
        fresh = Client(url, side)
        result["warm_cache_first_edit_s"] = round(fresh.edit(0), 3)  # at steady latency if nothing compiles
        result["warm_cache_first_edit_stages_ms"] = fresh.stage_medians(1)
        serve.shutdown()
        save()
        if not args.no_unbatched:
            unbatched(config, root, side, max(levels), args.rounds, result, save)
        top = max(levels)
        batched = next(row for row in result["batched"] if row["concurrent"] == top)
        result[f"p95_s_{top}"] = batched["p95_s"]
        if "unbatched" in result:
            result[f"batched_vs_unbatched_{top}"] = round(batched["images_per_s"] / result["unbatched"][0]["images_per_s"], 3)
        save()


if __name__ == "__main__":
    main()
