"""End-to-end training benchmark: `longcat-ray train` itself, beside the plain eager loop, in one process tree.

1. The eager baseline (benchmarks/baseline_eager.py: torch + peft + fused AdamW, FlashAttention-2) on the same
   card, in a subprocess, before anything else holds GPU memory (always on a GPU unless --no-baseline).
2. A workspace: a pipeline folder with the full-size DiT (random bf16 weights, the real config) beside small
   random encoders whose prompt embeddings have the real shape (3584 wide, 710 tokens at 768²), `--pairs`
   synthetic 768² pairs, and a SimpleTuner config; `longcat-ray cache` builds the cache (Ray Data).
3. Per row, `longcat_ray.training.train` (what `longcat-ray train` calls): Ray Train + DeepSpeed (ZeRO-1 unless the row says) reading
   the cache through Ray Data. Steady-state s/sample comes from the loop's own log windows
   (output_dir/logs/metrics-rank0.jsonl) after the first `--skip` steps; the warm-up (setup + the steps
   skipped) is reported apart, as are the first 10 losses (same seed and data order in every row).

    python -m benchmarks.train_e2e --rows plain,fast,fast_fp8 [--steps 30] [--pairs 64] [--no-baseline]
    python -m benchmarks.train_e2e --size tiny --rows plain,fast_fp8 --steps 10 --pairs 8   # CPU smoke run

Writes $OUT/train_e2e_<card>.json ({"card", "date", "commit", "rows": [...]}) after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRAIN_TFLOP_768 = 108.8  # per 768² sample, LoRA, no recomputation (DESIGN.md §4)
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
FULL_DIT = dict(patch_size=1, in_channels=64, num_layers=10, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, pooled_projection_dim=3584, axes_dims_rope=[16, 56, 56])
# Each row: config keys over the workspace's config (SimpleTuner's flat names). "plain" is the product with every
# speed lever off (the path measured in issue 14's table).
LEVERS_OFF = {"compile": False, "attention": "sdpa", "base_model_precision": "no_change", "zero_stage": 2}
ROWS: dict[str, dict] = {
    "plain": {**LEVERS_OFF, "gradient_checkpointing": False},
    "plain_ckpt": {**LEVERS_OFF, "gradient_checkpointing": True},
    "cudnn": {**LEVERS_OFF, "attention": "cudnn", "gradient_checkpointing": False},
    "compile": {**LEVERS_OFF, "compile": True, "gradient_checkpointing": False},
    "fast": {"compile": True, "attention": "auto", "gradient_checkpointing": False},
    "fast_fp8": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": False},
    "fast_fp8_static": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                        "gradient_checkpointing": False, "compile_dynamic": False},
    "fast_fp8_symbolic": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                          "gradient_checkpointing": False, "compile_dynamic": True},
    "fast_fp8_unfused": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                         "gradient_checkpointing": False, "fuse_qkv": False},
    "fast_fp8_graphs": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                        "gradient_checkpointing": False, "cuda_graphs": True},
    "fast_fp8_nographs": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                          "gradient_checkpointing": False, "cuda_graphs": False},
    "fast_fp8_b0_nographs": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                             "gradient_checkpointing": True, "activation_memory_budget": 0.0, "cuda_graphs": False},
    "fast_fp8_b0_graphs": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                           "gradient_checkpointing": True, "activation_memory_budget": 0.0, "cuda_graphs": True},
    "fast_fp8_z2": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": False,
                    "zero_stage": 2},
    "fast_fp8_cpp": {"compile": True, "compile_wrapper": "cpp", "attention": "auto", "base_model_precision": "fp8-matmul",
                     "gradient_checkpointing": False},
    "fast_ckpt": {"compile": True, "attention": "auto", "gradient_checkpointing": True},
    "fast_fp8_ckpt": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": True},
    "fast_fp8_ckpt2": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                       "gradient_checkpointing": True, "gradient_checkpointing_interval": 2},
    "fast_fp8_ckpt3": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                       "gradient_checkpointing": True, "gradient_checkpointing_interval": 3},
    # the compiler picks what to recompute (activation_memory_budget; the `*_ckpt` rows above get its default, 0)
    "fast_fp8_b5": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": True,
                    "activation_memory_budget": 0.5},
    "fast_fp8_b3": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": True,
                    "activation_memory_budget": 0.3},
    "fast_fp8_b1": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": True,
                    "activation_memory_budget": 0.1},
    "fast_fp8_b0": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul", "gradient_checkpointing": True,
                    "activation_memory_budget": 0.0},
    "fast_fp8_b0_offload": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                            "gradient_checkpointing": True, "activation_memory_budget": 0.0, "offload_optimizer": "cpu"},
    "fast_fp8_b0_actoff": {"compile": True, "attention": "auto", "base_model_precision": "fp8-matmul",
                           "gradient_checkpointing": True, "activation_memory_budget": 0.0, "offload_activations": "cpu"},
    "int8_ckpt": {"compile": None, "attention": "auto", "base_model_precision": "int8-torchao", "gradient_checkpointing": True},
    "fp8wo_ckpt": {"compile": None, "attention": "auto", "base_model_precision": "fp8-torchao", "gradient_checkpointing": True},
}


def build_workspace(root: Path, size: str, pairs: int, side: int, shapes: list[tuple[int, int]] | None = None) -> Path:
    """Pipeline + pairs (square at `side`, or cycling through `shapes`, (width, height) each, bucketed at side²'s
    area) + config under `root` (reused when already complete); -> the config path."""
    from longcat_ray.tiny import make_tiny, write_tiny_dataset

    config_path = root / "config" / "config.json"
    if (root / "READY").exists():
        return config_path
    paths = make_tiny(root, pairs=0)
    write_tiny_dataset(paths.edits, paths.refs, pairs, seed=0, sizes=tuple(shapes or [(side, side)]))
    if size == "full":
        save_full_pipeline(paths.model)
    flat = json.loads(config_path.read_text())
    flat.update({"--train_batch_size": 1, "--lora_rank": 32, "--lora_alpha": 32, "--learning_rate": "1e-4",
                 "--validation_steps": 0, "--resume_from_checkpoint": None, "--checkpointing_steps": 10**6,
                 "--mixed_precision": "bf16" if size == "full" else "no"})
    config_path.write_text(json.dumps(flat, indent=2))
    backend = json.loads(paths.backend.read_text())
    for dataset in backend:
        if dataset.get("dataset_type") != "text_embeds":
            dataset["resolution"] = side
    paths.backend.write_text(json.dumps(backend, indent=2))
    (root / "READY").write_text("ok\n")
    return config_path


def save_full_pipeline(model_dir: Path) -> None:
    """Replace the tiny DiT with the full-size one (random bf16 weights) and the text encoder with one whose
    prompt embeddings are 3584 wide, as the real Qwen2.5-VL-7B's."""
    import torch
    from diffusers import LongCatImageEditPipeline, LongCatImageTransformer2DModel

    from longcat_ray.tiny import build_tiny_text_encoder

    pipe = LongCatImageEditPipeline.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        pipe.transformer = LongCatImageTransformer2DModel(**FULL_DIT).to(torch.bfloat16)
    pipe.text_encoder = build_tiny_text_encoder(pipe.tokenizer, seed=2, hidden=3584)
    shutil.rmtree(model_dir)  # no tiny weight file may stay beside the full model's shards
    pipe.save_pretrained(model_dir)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_baseline(out: Path) -> dict:
    """The eager loop (FlashAttention-2, as ../shared/gpu/README.md runs it) in its own process."""
    env = {**os.environ, "NO_CUDNN_SDP": "1", "OUT": str(out)}
    script = Path(__file__).with_name("baseline_eager.py")
    done = subprocess.run([sys.executable, str(script), "nockpt", "ckpt"], env=env, capture_output=True, text=True)
    print(done.stdout[-2000:], done.stderr[-2000:] if done.returncode else "", flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-800:]}


def row_config(config_path: Path, name: str, steps: int, out: Path, profile: bool = False):
    from longcat_ray.config import load_config

    config, _ = load_config(config_path)
    config.train.output_dir = str(out / "runs" / name)
    config.train.max_train_steps = steps
    config.train.max_failures = 0  # a row that fails fails once: Ray Train's retries cost the call's minutes
    if profile:  # the last full log window before the end; summarise leaves it out of the steady state
        config.train.profile_steps = (steps - 3, steps - 2)
    for key, value in ROWS[name].items():
        section = config.model if key == "base_model_precision" else config.train
        setattr(section, key, value)
    return config


def summarise(name: str, windows: list[dict], skip: int, side: int, baseline: dict, profiled=None) -> dict:
    """The loop's log windows -> one result row (steady state: windows that start after step `skip`, less any
    window holding profiled steps)."""
    first = windows[0]
    low, high = profiled or (0, -1)
    steady = [w for w in windows if w["step"] - w["window_steps"] >= skip and not (w["step"] - w["window_steps"] < high and w["step"] >= low)]
    steps = sum(w["window_steps"] for w in steady)
    seconds = sum(w["step_time_s"] * w["window_steps"] for w in steady)
    samples = sum(w["samples_per_s"] * w["step_time_s"] * w["window_steps"] for w in steady)  # every worker's
    s = seconds / samples if samples else float("nan")  # wall seconds per sample, all GPUs together
    gpus = first.get("workers", 1)
    warm = [w for w in windows if w["step"] - w["window_steps"] < skip]
    tflop = TRAIN_TFLOP_768 * (side / 768) ** 2
    losses = [x for w in windows for x in w.get("losses", [])]
    row = dict(ROWS[name])
    return {
        "row": name,
        "gpus": gpus,
        "grad_ckpt": bool(row.get("gradient_checkpointing")),
        "grad_ckpt_interval": row.get("gradient_checkpointing_interval"),
        "base_model_precision": row.get("base_model_precision", "no_change"),
        "compile": row.get("compile"),
        "attention": row.get("attention"),
        "zero_stage": row.get("zero_stage", 1),
        "compile_wrapper": row.get("compile_wrapper", "python"),
        "compile_dynamic": row.get("compile_dynamic"),
        "fuse_qkv": row.get("fuse_qkv", True),
        "cuda_graphs": row.get("cuda_graphs", "default"),  # default: on where compile is (from the tenth session)
        "offload_optimizer": row.get("offload_optimizer", "none"),
        "s_per_sample": round(s, 4),
        "samples_per_s": round(1 / s, 3),
        "mfu_989": round(tflop / (s * gpus) / PEAK_TFLOPS, 3),
        "peak_gib": round(max(w["peak_gib"] for w in steady or windows), 2),
        "resident_gib": round(windows[-1].get("resident_gib", float("nan")), 2),
        "setup_peak_gib": round(first["setup_peak_gib"], 2),
        "setup_s": round(first["setup_s"], 1),
        "warmup_s": round(first["setup_s"] + sum(w["step_time_s"] * w["window_steps"] for w in warm), 1),
        "first_step_s": round(first["step_time_s"], 1),
        "steady_steps": steps,
        "baseline_s_per_sample": baseline.get("train_eager_ckpt" if row.get("gradient_checkpointing") else "train_eager_no_ckpt", {}).get("s_per_sample"),
        "first_losses": [round(x, 5) for x in losses[:10]],
    }


def run_row(config_path: Path, name: str, args, baseline: dict) -> dict:
    from longcat_ray.training import LEVERS_LOG, METRICS_LOG, train

    config = row_config(config_path, name, args.steps, Path(args.work), profile=name in args.profile.split(","))
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # a fresh run: its logs hold this row alone
    started = time.perf_counter()
    try:
        train(config, progress=False)
    except Exception as err:  # noqa: BLE001 -- one broken row must not lose the others
        return {"row": name, "error": f"{type(err).__name__}: {str(err)[-1500:]}"}
    log = Path(config.train.output_dir) / "logs" / METRICS_LOG
    windows = [json.loads(line) for line in log.read_text().splitlines()]
    result = summarise(name, windows, args.skip, args.side, baseline, config.train.profile_steps)
    levers = json.loads(log.with_name(LEVERS_LOG).read_text().splitlines()[-1])  # what the worker resolved
    result.update(activation_memory_budget=levers["activation_memory_budget"], compile_dynamic=levers["compile_dynamic"])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    for written, kept in (("profile-rank0.txt", f"profile_{name}.txt"), ("trace-rank0.json.gz", f"trace_{name}.json.gz")):
        if log.with_name(written).exists():
            shutil.copy(log.with_name(written), Path(args.out) / kept)
    return result


def git_commit() -> str:
    """LONGCAT_RAY_COMMIT when set (a device copy of the tree may carry a stale .git), else git's HEAD."""
    if os.environ.get("LONGCAT_RAY_COMMIT"):
        return os.environ["LONGCAT_RAY_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def write(result: dict, out: Path) -> None:
    card = result["card"].replace("NVIDIA ", "").split()[0].lower()
    path = out / f"train_e2e_{card}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="plain,fast,fast_fp8", help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--shapes", default="", help="image sizes WxH,WxH,... the pairs cycle through (several aspect "
                        "buckets of side²'s area; MFU still counts side² tokens); default: side x side")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the steady state (compile, warm-up)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the eager baseline (by default it runs first on a GPU, in the same call as the rows)")
    parser.add_argument("--profile", default="", help="rows to run torch.profiler in (two steps near the end)")
    parser.add_argument("--work", default="/tmp/longcat-ray-e2e", help="workspace (reused when complete)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "command": " ".join(sys.argv),
              "baseline": run_baseline(out) if torch.cuda.is_available() and not args.no_baseline else {}, "rows": []}
    write(result, out)
    built = time.perf_counter()
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",") if shape]
    config_path = build_workspace(Path(args.work), args.size, args.pairs, args.side, shapes)
    result["workspace_s"] = round(time.perf_counter() - built, 1)
    from longcat_ray.cache import build_cache
    from longcat_ray.config import load_config
    from longcat_ray.runtime import init_ray

    init_ray()
    cached = time.perf_counter()
    print(build_cache(load_config(config_path)[0], progress=False), flush=True)
    result["cache_s"] = round(time.perf_counter() - cached, 1)
    for name in args.rows.split(","):
        result["rows"].append(run_row(config_path, name, args, result["baseline"]))
        print(json.dumps(result["rows"][-1]), flush=True)
        write(result, out)


if __name__ == "__main__":
    main()
