"""Training-step benchmark: the project's training pieces on Ray Train + DeepSpeed, full-size DiT config.

Random bf16 weights with the real LongCat-Image-Edit transformer config (10 double + 20 single blocks,
d=3072), LoRA r=32 on the official targets (`longcat_ray.model.transformer.add_lora`), the engine from
`longcat_ray.zero`, the loss from `longcat_ray.model.loss`, a 768x768 edit (2304 target + 2304 reference
tokens, 710 text tokens), one Ray Train worker per GPU. Reports s/step, samples/s, MFU against 790 TFLOP/s
(108.8 TFLOP per 768² sample), peak memory and the time to save a checkpoint.

    python -m benchmarks.train_step --gpus 1,2 --zero 2,3 --batch 1 [--no-ckpt] [--size tiny (CPU smoke)]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

FULL = dict(num_layers=10, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, pooled_projection_dim=3584, axes_dims_rope=[16, 56, 56])
TINY = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[4, 6, 6])
TRAIN_TFLOP_768 = 108.8
PEAK_TFLOPS = 790.0


def build_transformer(size: str, device: torch.device, dtype: torch.dtype):
    from diffusers import LongCatImageTransformer2DModel

    torch.manual_seed(0)
    with device:
        model = LongCatImageTransformer2DModel(patch_size=1, in_channels=64, **(FULL if size == "full" else TINY))
    return model.to(dtype).requires_grad_(False)


def worker(cfg: dict) -> None:
    """One Ray Train worker: model, LoRA, DeepSpeed engine, timed steps, a timed checkpoint save."""
    import ray.train

    from longcat_ray.config import LoraConfig, TrainConfig
    from longcat_ray.model.loss import flow_matching_loss
    from longcat_ray.model.transformer import add_lora
    from longcat_ray.zero import init_engine, save_checkpoint

    context = ray.train.get_context()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", context.get_local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_transformer(cfg["size"], device, dtype)
    if cfg["ckpt"]:
        model.enable_gradient_checkpointing()
    params = add_lora(model, LoraConfig(rank=32, alpha=32), seed=0)
    train = TrainConfig(train_batch_size=cfg["batch"], zero_stage=cfg["zero"], mixed_precision="bf16" if cuda else "no",
                        gradient_checkpointing=cfg["ckpt"], learning_rate=1e-4, max_train_steps=10**6)
    engine, _ = init_engine(model, params, train, context.get_world_size())
    side, b = cfg["side"], cfg["batch"]
    text_dim, text_len = (3584, 710) if cfg["size"] == "full" else (64, 64)
    edit = torch.randn(b, 16, side // 8, side // 8, device=device, dtype=dtype)
    ref = torch.randn_like(edit)
    text = torch.randn(b, text_len, text_dim, device=device, dtype=dtype)

    def step(i: int) -> None:
        loss = flow_matching_loss(engine, edit, ref, text, torch.Generator().manual_seed(i))
        engine.backward(loss)
        engine.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(cfg["warmup"]):
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(cfg["iters"]):
        step(100 + i)
    sync()
    seconds = (time.perf_counter() - start) / cfg["iters"]
    with tempfile.TemporaryDirectory() as directory:
        saved = time.perf_counter()
        save_checkpoint(engine, directory, {"bench": True})
        save_s = time.perf_counter() - saved
    world = context.get_world_size()
    flops = TRAIN_TFLOP_768 * (side / 768) ** 2 * b  # per GPU per step (attention scales a bit faster)
    metrics = {
        "s_per_step": round(seconds, 4),
        "samples_per_s": round(b * world / seconds, 2),
        "mfu_790": round(flops / seconds / PEAK_TFLOPS, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0.0,
        "checkpoint_save_s": round(save_s, 2),
    }
    with tempfile.TemporaryDirectory() as directory:  # Ray Train V2 keeps the metrics of checkpointed reports
        with open(os.path.join(directory, "metrics.json"), "w") as handle:
            json.dump(metrics, handle)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run(gpus: int, zero: int, batch: int, ckpt: bool, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from benchmarks import train_step  # by module name, so workers import it instead of unpickling __main__

    cfg = {"size": args.size, "zero": zero, "batch": batch, "ckpt": ckpt, "side": args.side, "warmup": args.warmup, "iters": args.iters}
    trainer = TorchTrainer(
        train_step.worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=gpus, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(), name=f"bench-{gpus}-{zero}-{batch}-{int(ckpt)}"),
    )
    return {"gpus": gpus, "zero": zero, "batch": batch, "grad_ckpt": ckpt, **trainer.fit().metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--zero", default="2")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--no-ckpt", action="store_true", help="also run without gradient checkpointing")
    parser.add_argument("--size", default="full", choices=["full", "tiny"])
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_step.json"))
    args = parser.parse_args()

    from longcat_ray.runtime import init_ray

    init_ray()
    rows = []
    for gpus in map(int, args.gpus.split(",")):
        for zero in map(int, args.zero.split(",")):
            for batch in map(int, args.batch.split(",")):
                for ckpt in (True, False) if args.no_ckpt else (True,):
                    rows.append(run(gpus, zero, batch, ckpt, args))
                    print(json.dumps(rows[-1]), flush=True)
    one = {(r["zero"], r["batch"], r["grad_ckpt"]): r["samples_per_s"] for r in rows if r["gpus"] == 1}
    for r in rows:
        base = one.get((r["zero"], r["batch"], r["grad_ckpt"]))
        r["scaling_vs_1gpu"] = round(r["samples_per_s"] / (base * r["gpus"]), 3) if base else None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    print(json.dumps(result))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
