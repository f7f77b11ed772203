"""Shared fixtures: the tiny preset is built once per session and shared read-only."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray workers inherit the driver's environment: credentials for the loopback S3 (moto) must exist before
# ray.init. They are test-only values for a server the tests start themselves.
for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(key, value)
# Ray Train's controller takes one `ray.train.report` per worker from each poll of its workers (every 2 s by default)
# and a worker's next report waits for the last to be taken: a tiny run checkpointing every 8 steps at 0.05 s a step
# spent most of its time waiting (64 steps: 41 s at 2 s, 28 s at 0.25 s on 2 cores), and a run ends up to two polls
# after its last step. The tests' Rays poll every 0.25 s (ray_cluster.local_cluster passes it on); a real run
# checkpoints minutes apart and never waits for a poll but the last.
TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# A raylet keeps at most `num_workers_soft_limit` (default: its CPU count) worker processes and kills any idle one past
# that after `idle_worker_killing_time_threshold_ms` (1 s): each tiny run's Ray Data read tasks then started in fresh
# processes that imported torch again (~3 CPU-s each, 15 of them in the node-loss test, 2026-12-07). The tests' Rays
# keep up to 12 idle workers for 10 minutes instead, so a run reuses the processes the run before it warmed (three
# 8-step runs beside the reference: 166 s -> 127 s, 304 -> 215 CPU-s on 2 cores; `ray::Map` processes 19 -> 5). A
# real cluster keeps Ray's defaults (a test-only setting: nothing of it was measured on one).
WARM_WORKERS = {"RAY_num_workers_soft_limit": "12", "RAY_idle_worker_killing_time_threshold_ms": "600000"}
TEST_RAY_ENV = {**TRAIN_POLL, **WARM_WORKERS}  # what every Ray the tests start gets (ray_cluster.local_cluster too)
for key, value in TEST_RAY_ENV.items():
    os.environ.setdefault(key, value)


COMPILER_CONFIGS = ("torch._dynamo.config", "torch._functorch.config", "torch._inductor.config")


@pytest.fixture(autouse=True)
def compiler_config_restored():
    """The product sets torch's compiler config process-wide, as its training workers and replicas want
    (`speed_up_training`: the recompile limit, the activation memory budget, the C++ wrapper; `inference`: the cache
    size): each test ends with the values it started with, so none compiles under what an earlier test left (a
    budget of 0.0 from test_offload stayed for every later compile; a monkeypatch's undo hid one: CI, 2026-12-07)."""
    import importlib

    modules = [importlib.import_module(name) for name in COMPILER_CONFIGS]
    before = [module.get_config_copy() for module in modules]
    yield
    for module, saved in zip(modules, before):
        now = module.get_config_copy()
        for key in [key for key, value in saved.items() if now.get(key) != value]:
            setattr(module, key, saved[key])


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs ~10 s)."""
    import ray

    from longcat_ray.runtime import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> "TinyPaths":  # noqa: F821
    """The tiny model + 8 synthetic pairs + config (longcat_ray.tiny.make_tiny)."""
    from longcat_ray.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), pairs=8, seed=0)


@pytest.fixture(scope="session")
def tiny_pipe(tiny):
    """The tiny pipeline as diffusers loads it from disk (float32, CPU)."""
    from diffusers import LongCatImageEditPipeline

    pipe = LongCatImageEditPipeline.from_pretrained(tiny.model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(tiny, index: int = 1):
    from PIL import Image

    return Image.open(Path(tiny.refs) / f"pair_{index:04d}.png").convert("RGB")


@contextlib.contextmanager
def with_mrope(pipe):
    """The pipeline's text encoder, given the multimodal position ids (every pad at PAD_POSITION): what
    the pipeline computed on transformers 4.x, where the model was trained."""
    from longcat_ray.model.prompt import rope_positions

    encoder, merge = pipe.text_encoder, pipe.text_processor.image_processor.merge_size
    forward = encoder.forward

    def with_positions(**kwargs):
        ids, mask, grid = (kwargs[k].cpu() for k in ("input_ids", "attention_mask", "image_grid_thw"))
        positions = rope_positions(ids, mask, encoder.config.image_token_id, grid, merge)
        return forward(**kwargs, position_ids=positions.to(encoder.device))

    encoder.forward = with_positions
    try:
        yield pipe
    finally:
        del encoder.forward


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback: moto's server mode, as s3fs's own test suite uses."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def tiny_loras(tiny, tmp_path_factory) -> Path:
    """An adapter root: two random LoRAs exported as training exports them (style0/ as an output_dir,
    style1.safetensors as a bare file), style0 again as the official trainer writes a checkpoint (official/),
    one that does not fit the model, a LyCORIS LoKr file and non-safetensors files."""
    import torch
    from safetensors.torch import save_file

    from longcat_ray.config import LoraConfig, ModelConfig
    from longcat_ray.export import LORA_FILE, export_lora
    from longcat_ray.model.transformer import add_lora, load_transformer

    root = tmp_path_factory.mktemp("loras")
    for index in range(2):
        transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.float32, torch.device("cpu"))
        add_lora(transformer, LoraConfig(rank=4), seed=index)
        with torch.no_grad():
            for name, param in transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)  # a freshly initialised LoRA is the identity; these must change the output
        export_lora(transformer, str(root / f"style{index}"), {}, {"base_model": str(tiny.model)})
    (root / "style0.safetensors").unlink(missing_ok=True)
    (root / "style1" / LORA_FILE).rename(root / "style1.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 999)}, root / "misfit.safetensors")
    official_like(root / "style0" / "adapter", root / "official")
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, root / "lokr.safetensors")
    (root / "pickled.bin").write_bytes(b"\x80\x04not really a pickle")
    (root / "pickled.pt").write_bytes(b"\x80\x04not really a pickle")
    return root


def official_like(peft_folder, out) -> None:
    """`peft_folder`'s adapter as a PEFT checkpoint at twice its alpha and half its B: the same strength, read
    right only if alpha comes from adapter_config.json (alpha = rank would halve it)."""
    import json

    from safetensors.torch import load_file, save_file

    out.mkdir()
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * (config["lora_alpha"] or config["r"])
    (out / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(peft_folder / "adapter_model.safetensors")
    save_file({k: v / 2 if ".lora_B." in k else v for k, v in state.items()}, out / "adapter_model.safetensors")


STEPS = 64  # the tiny training runs' length (the `reference` run's): long enough for `ray job stop` to land mid-run
EVERY = 8  # the checkpoint interval of tiny_config's runs (the reference's) and of the fault tests


@pytest.fixture(scope="session")
def reference(tiny, ray_local, tmp_path_factory):
    """The uninterrupted run the fault tests end equal to: the tiny config as it is (2 CPU workers, ZeRO-1, the
    default), STEPS steps -> (config, TrainResult)."""
    from longcat_ray.training import train

    out = tmp_path_factory.mktemp("reference")
    return tiny_config(tiny, out), train(tiny_config(tiny, out), progress=False)


def tiny_config(tiny, out, **train):
    """The tiny preset's config for a STEPS-step run into `out` (alpha 8: scale 2), `train` keys overriding."""
    from longcat_ray.config import load_config

    config, _ = load_config(tiny.config)
    config.train.output_dir = str(out)
    config.train.max_train_steps = STEPS
    config.train.checkpointing_steps = EVERY
    config.train.learning_rate = 1e-2
    config.lora.alpha = 8.0  # scale 2: exports must carry alpha, not assume alpha == rank
    config.validation.steps = STEPS // 2
    config.validation.num_inference_steps = 2
    config.validation.num_pairs = 2
    for key, value in train.items():
        setattr(config.train, key, value)
    return config

