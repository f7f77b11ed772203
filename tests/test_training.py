"""Training end to end on the tiny model: real Ray Train, real DeepSpeed (gloo), 2 CPU workers."""

import glob
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from longcat_ray.cache import make_plan, read_manifest
from longcat_ray.export import LORA_FILE, PEFT_DIR
from longcat_ray.inference import EditRequest, edit_image
from longcat_ray.model.loss import flow_matching_loss
from longcat_ray.reader import batch_tensors, plan_epoch, shard_dataset
from longcat_ray.training import LEVERS_LOG, LOG_EVERY, METRICS_LOG, train
from tests.conftest import EVERY, STEPS, reference_image, tiny_config
from tests.ray_cluster import processes_under
from tests.run_logs import committed, ray_info_lines, samples_log

pytestmark = pytest.mark.slow


def lora_transformer(tiny, out):
    from diffusers import LongCatImageTransformer2DModel

    transformer = LongCatImageTransformer2DModel.from_pretrained(str(tiny.model), subfolder="transformer")
    transformer.load_lora_adapter(str(out), weight_name=LORA_FILE, prefix="transformer")
    return transformer.eval()


@torch.no_grad()
def eval_loss(transformer, config) -> float:
    """Flow-matching loss over every cached pair with fixed noise: comparable across models."""
    manifest, losses = read_manifest(config), []
    batches = plan_epoch(manifest, 1, 1, seed=0, epoch=0)[0]
    for i, row in enumerate(shard_dataset(batches, make_plan(config).options).iter_rows()):
        tensors = batch_tensors(row)
        for draw in range(4):
            generator = torch.Generator().manual_seed(1000 * i + draw)
            losses.append(flow_matching_loss(transformer, tensors["edit"], tensors["ref"], tensors["text"], generator).item())
    return sum(losses) / len(losses)


def test_loss_falls_and_the_lora_loads_in_diffusers_and_peft(reference, tiny_pipe, tiny):
    from peft import PeftModel

    config, result = reference
    out = config.train.output_dir
    assert result.steps == STEPS
    base = eval_loss(tiny_pipe.transformer, config)
    trained = lora_transformer(tiny, out)
    assert eval_loss(trained, config) < 0.85 * base

    # every adapter weight in the file lands in the model (B starts at zero: a key that failed to load stays
    # zero), and diffusers applies alpha/rank = 2 as PEFT does
    state = load_file(os.path.join(out, LORA_FILE))
    assert all(k.startswith("transformer.") for k in state)
    loaded = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert len(loaded) == len(state) and all(p.abs().sum() > 0 for n, p in loaded.items() if "lora_B" in n)
    from diffusers import LongCatImageTransformer2DModel

    base_model = LongCatImageTransformer2DModel.from_pretrained(str(tiny.model), subfolder="transformer").eval()
    peft_model = PeftModel.from_pretrained(base_model, os.path.join(out, PEFT_DIR)).eval()
    tensors = next(iter(shard_dataset(plan_epoch(read_manifest(config), 1, 1, 0, 0)[0], make_plan(config).options).iter_rows()))
    tensors = batch_tensors(tensors)
    loss_d = flow_matching_loss(trained, tensors["edit"], tensors["ref"], tensors["text"], torch.Generator().manual_seed(5))
    loss_p = flow_matching_loss(peft_model, tensors["edit"], tensors["ref"], tensors["text"], torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss_d, loss_p)
    assert json.load(open(os.path.join(out, "longcat_ray.json")))["alpha"] == 8.0
    # what the run resolved, logged once at its start (on CPU: no compile, so no compile_dynamic)
    levers = [json.loads(line) for line in open(os.path.join(out, "logs", LEVERS_LOG))]
    assert [(lv["step"], lv["compile"], lv["compile_dynamic"]) for lv in levers] == [(0, False, None)], levers
    # in-training validation grids: 2 pairs x (reference | target | result)
    grids = sorted(glob.glob(os.path.join(out, "validation", "step_*.png")))
    assert [os.path.basename(g) for g in grids] == [f"step_{STEPS // 2:06d}.png", f"step_{STEPS:06d}.png"]

    # the pipeline's output changes with the LoRA
    request = EditRequest(prompt="swap the red and blue colours", width=128, height=128, steps=2, guidance=4.5)
    before = torch.tensor(list(edit_image(tiny_pipe, reference_image(tiny), request).getdata()), dtype=torch.float32)
    original, tiny_pipe.transformer = tiny_pipe.transformer, trained
    try:
        after = torch.tensor(list(edit_image(tiny_pipe, reference_image(tiny), request).getdata()), dtype=torch.float32)
    finally:
        tiny_pipe.transformer = original
    assert (before - after).abs().mean() > 1.0


def first_checkpoint_lora(config) -> dict[str, torch.Tensor]:
    """The reference run's LoRA at its first checkpoint (step 8), as the checkpoint holds it."""
    first = sorted(glob.glob(os.path.join(config.train.output_dir, "run", "checkpoint_*")))[0]
    return load_file(os.path.join(first, "lora", LORA_FILE))


def test_zero3_export_equals_the_default_zero1_run(reference, tiny, tmp_path):
    """8 steps of ZeRO-3 (DeepSpeed's own clipping) against the ZeRO-1 run (the optimizer's) at its step-8 checkpoint."""
    config, _ = reference
    zero3 = tiny_config(tiny, tmp_path, zero_stage=3, max_train_steps=8)
    zero3.validation.steps = 0
    train(zero3, progress=False)
    one, three = first_checkpoint_lora(config), load_file(os.path.join(tmp_path, LORA_FILE))
    assert one.keys() == three.keys()
    for key in one:
        torch.testing.assert_close(three[key], one[key], atol=1e-4, rtol=1e-3)


def logged_losses(out) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "logs"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss")}


def encoder_actors() -> int:
    """CacheEncoder actors the session's Ray has started so far (dead ones too): each loads the encoders."""
    from ray.util.state import list_actors

    return sum("CacheEncoder" in actor.class_name for actor in list_actors(limit=10_000, raise_on_missing_output=False))


def test_streamed_trains_as_the_cache(reference, tiny, tmp_path):
    """8 steps streamed (encoded on the fly, only the validation pairs cached, each rank's encoder loaded once): the
    same samples, losses and LoRA as the cached run at its step-8 checkpoint. (Resuming from a checkpoint is the
    worker+driver loss test's.)"""
    cached, _ = reference
    streamed = tiny_config(tiny, tmp_path, max_train_steps=8)
    streamed.data.cache_streaming = True
    streamed.data.text_cache_dir = str(tmp_path / "stream-cache" / "text")
    for dataset in streamed.data.datasets:
        dataset.cache_dir_vae = str(tmp_path / "stream-cache" / dataset.id)
    encoders = encoder_actors()
    assert train(streamed, progress=False).steps == 8
    # the validation pairs' cache stage's encoder, then one per rank for the whole run (8 steps are 2 epochs)
    assert encoder_actors() - encoders == 1 + 2
    written = {path.name.rsplit("-", 1)[0] for path in (tmp_path / "stream-cache").rglob("*.safetensors")}
    first_two = sorted(read_manifest(cached), key=lambda m: m["sample_id"])[:2]
    assert written == {m["sample_id"].replace("/", "__") for m in first_two}
    for rank in (0, 1):
        mine = samples_log(tmp_path, rank)
        assert mine == samples_log(cached.train.output_dir, rank)[: len(mine)]
    losses, straight = logged_losses(tmp_path), logged_losses(cached.train.output_dir)
    assert set(losses) >= {1, 5}  # rank 0 logs step 1 and every LOG_EVERY (5) steps
    for step, loss in losses.items():
        assert loss == pytest.approx(straight[step], rel=1e-4)
    streamed_lora, at_8 = load_file(os.path.join(tmp_path, LORA_FILE)), first_checkpoint_lora(cached)
    for key in at_8:
        torch.testing.assert_close(streamed_lora[key], at_8[key], atol=1e-5, rtol=1e-4)


def step_losses(out) -> list[float]:
    """Every step's loss, in order, from the loop's JSON log (read once per log window)."""
    with open(os.path.join(out, "logs", METRICS_LOG)) as handle:
        return [loss for line in handle for loss in json.loads(line)["losses"]]


def test_speed_levers_train_the_same_model(reference, tiny, tmp_path):
    """fp8 matmuls on the frozen base + every-other-block checkpointing + the saved activations in host memory,
    through the whole loop for 8 steps: the same losses step by step and the same LoRA as the plain run's checkpoint
    at step 8, within fp8's error (e4m3 activations and weights, e5m2 gradients; the offload is exact,
    tests/model/test_offload.py). The other levers (compile, cuDNN attention) are checked at the model level in
    tests/model (compile) and on a GPU (cuDNN)."""
    plain, _ = reference
    config = tiny_config(tiny, tmp_path, max_train_steps=8, gradient_checkpointing_interval=2, offload_activations="cpu")
    config.model.base_model_precision = "fp8-matmul"
    config.validation.steps = 0
    train(config, progress=False)
    fast, slow = step_losses(tmp_path), step_losses(plain.train.output_dir)[:8]
    assert len(fast) == 8
    with open(os.path.join(tmp_path, "logs", METRICS_LOG)) as handle:
        assert all(json.loads(line)["offloaded_gib_per_step"] > 0 for line in handle)  # the loop's forward offloaded
    assert fast != slow  # fp8 really ran: it moves the low bits (a silently skipped conversion would not)
    assert fast == pytest.approx(slow, rel=0.02)
    theirs, mine = first_checkpoint_lora(plain), load_file(os.path.join(tmp_path, LORA_FILE))
    for key in theirs:
        cosine = torch.nn.functional.cosine_similarity(mine[key].flatten(), theirs[key].flatten(), dim=0)
        assert cosine > 0.98, key




def test_a_killed_driver_and_the_same_command_again_end_as_the_uninterrupted_run(reference, tiny, tmp_path):
    """`longcat-ray train` (the CLI, in its own process and its own Ray) SIGKILLed after the step-8 checkpoint is
    recorded (its Ray and workers die with it); the same command again resumes from a checkpoint, not from scratch, and
    the run ends as the uninterrupted reference did: the same samples at every step (the last time each step ran) and
    the same LoRA. (A worker lost mid-run, with its node: tests/test_node_loss.py.)"""
    import subprocess
    import sys

    cached, _ = reference
    raw = json.loads(tiny.config.read_text())
    raw.update({"--output_dir": str(tmp_path / "out"), "--max_train_steps": STEPS, "--checkpointing_steps": EVERY,
                "--lora_alpha": 8, "--validation_steps": 0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    command = [sys.executable, "-c", "import sys; from longcat_ray.cli import main; sys.exit(main())", "train",
               "--config", str(tmp_path / "config.json")]
    out = tmp_path / "out"
    # the CLI's own filter, not one inherited from this process (importing the package here set it too)
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS_SKIP_REGEX"}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 600
    while committed(out) < 1:  # step 8's checkpoint
        assert time.time() < deadline and driver.poll() is None, f"the run ended or stalled first (exit {driver.poll()})"
        time.sleep(0.1)
    workers = processes_under(driver.pid, "RayTrainWorker")  # before its death hands them to init
    driver.send_signal(signal.SIGKILL)  # at once: the rest of the run takes seconds
    driver.wait()
    psutil.wait_procs(workers, timeout=60)  # they die with its Ray
    first_run = {rank: [line["micro_step"] for line in samples_log(out, rank)] for rank in (0, 1)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr  # what the user reads: each rank-0 line once, none of Ray's INFO chatter
    last_logged = STEPS - STEPS % LOG_EVERY  # rank 0 logs every LOG_EVERY steps
    assert sum(f"step {last_logged}/{STEPS} " in line for line in output.splitlines()) == 1, output[:3000]
    assert not ray_info_lines(output), ray_info_lines(output)
    assert "'PreemptionWatcher'" not in output, output[-3000:]  # Ray's core-worker line for Ray Train's own actor
    for rank in (0, 1):
        steps = [line["micro_step"] for line in samples_log(out, rank)]
        assert steps.count(0) == 1, steps  # not from scratch
        assert len(steps) > len(first_run[rank]), "the second command trained no step (the driver died too late)"
        resumed_from = steps[len(first_run[rank])]  # the second command's first step: a recorded checkpoint's
        assert resumed_from % EVERY == 0 and EVERY <= resumed_from <= max(first_run[rank]) + 1, (resumed_from, steps)
        last_runs = {line["micro_step"]: line for line in samples_log(out, rank)}
        assert list(last_runs.values()) == samples_log(cached.train.output_dir, rank)
    starts = [json.loads(line)["step"] for line in open(out / "logs" / LEVERS_LOG)]
    assert len(starts) == 2 and starts[0] == 0 < starts[1], starts  # one line per start: the resumed one after
    final, straight = load_file(out / LORA_FILE), load_file(os.path.join(cached.train.output_dir, LORA_FILE))
    for key in straight:
        torch.testing.assert_close(final[key], straight[key], atol=1e-5, rtol=1e-4)


def test_a_non_finite_loss_stops_the_run_naming_the_steps():
    from longcat_ray.training import NonFiniteLoss, check_finite

    check_finite([1.0, 0.5], step=10, steps=2)
    with pytest.raises(NonFiniteLoss, match="within steps 9-10"):
        check_finite([1.0, float("nan")], step=10, steps=2)


def test_a_worker_error_ray_cannot_pickle_reaches_the_driver_as_text():
    """torch.compile's InductorError holds a frame: Ray would report only "cannot pickle 'frame' object"."""
    import sys

    from longcat_ray.training import sendable

    class HoldsAFrame(Exception):
        def __init__(self, message):
            super().__init__(message)
            self.frame = sys._getframe()

    try:
        raise HoldsAFrame("CudaKernelParamCache not populated for triton_red_fused_0")
    except HoldsAFrame as err:
        sent = sendable(err)
    assert isinstance(sent, RuntimeError)
    assert "HoldsAFrame: CudaKernelParamCache not populated for triton_red_fused_0" in str(sent)
    assert "Traceback" in str(sent) and "test_a_worker_error_ray_cannot_pickle" in str(sent)
    plain = ValueError("bad key")
    assert sendable(plain) is plain  # what Ray can send goes as it is (its type kept)


@pytest.mark.parametrize("keys,budget", [
    ({}, 0.0),  # gradient_checkpointing's default, under compile: the compiler recomputes
    ({"activation_memory_budget": 0.5}, 0.5),
    ({"gradient_checkpointing_interval": 2}, None),  # whole blocks, every other one, as asked
    ({"gradient_checkpointing": False}, None),
    ({"gradient_checkpointing": False, "activation_memory_budget": 0.3}, 0.3),
])
def test_checkpointing_under_compile_is_the_compilers_recomputation(keys, budget):
    from longcat_ray.config import TrainConfig
    from longcat_ray.training import recompute_budget

    assert recompute_budget(TrainConfig(**keys)) == budget


def test_the_plan_counts_each_readers_needs_and_refuses_what_cannot_run(tiny, tmp_path, ray_local):
    """Cached: a CPU per worker for its read tasks; streaming: its own encoder actor, whose GPU share a GPU cluster
    must hold beside the workers' (a streamed run on 1 GPU per worker and 1 per encoder waits forever on a cluster
    with one GPU per worker). Checked against the session's real local Ray (no GPUs)."""
    from longcat_ray.training import ClusterTooSmall, check_cluster_fits, reader_resources, worker_resources

    config = tiny_config(tiny, tmp_path)
    assert reader_resources(config, gpus=0) == {"CPU": 1}
    config.data.cache_streaming = True
    assert reader_resources(config, gpus=0) == {"CPU": 0.5, "GPU": 0}
    assert reader_resources(config, gpus=8) == {"CPU": 1, "GPU": config.data.stream_encoder_gpus}
    check_cluster_fits(worker_resources(0), reader_resources(config, 0), 2)  # 2 x (1 + 0.5) CPUs of the 4
    with pytest.raises(ClusterTooSmall, match=r"GPU 2 needed, 0 in the cluster.*stream_encoder_gpus"):
        check_cluster_fits(worker_resources(1), reader_resources(config, 1), 1)


def test_a_gpu_model_with_none_up_needs_a_worker_count_and_pins_each_worker(tiny, tmp_path):
    """accelerator_type with no GPU of that model up (an autoscaling cluster at 0 workers): the count cannot be read
    from the cluster, so the plan asks for num_workers; each worker's bundle then asks for that model."""
    from longcat_ray.training import ClusterTooSmall, worker_count, worker_resources

    config = tiny_config(tiny, tmp_path, accelerator_type="H100")
    with pytest.raises(ClusterTooSmall, match=r"no H100 GPU is up.*Fix: set num_workers \(--workers N\)"):
        worker_count(config, gpus=0)
    assert worker_count(config, gpus=8) == 8
    config.train.num_workers = 16
    assert worker_count(config, gpus=0) == 16
    assert worker_resources(True, "H100") == {"CPU": 1, "GPU": 1, "accelerator_type:H100": 0.001}


def test_compile_dynamic_defaults_to_static_for_a_few_batch_shapes():
    """`compile_dynamic: null` resolves per run: static while the run has at most STATIC_SHAPES_BY_DEFAULT batch
    shapes (bucket and batch length), torch's default beyond; a configured value always wins; no compile, no value."""
    from longcat_ray.config import Config, TrainConfig
    from longcat_ray.training import STATIC_SHAPES_BY_DEFAULT, batch_shapes, resolved_levers

    def manifest(buckets: int, per_bucket: int) -> list[dict]:
        return [{"sample_id": f"{b}/{i}", "bucket_w": 64 * (b + 1), "bucket_h": 64} for b in range(buckets) for i in range(per_bucket)]

    assert batch_shapes(manifest(3, 5), TrainConfig(train_batch_size=1), world=1) == 3
    assert batch_shapes(manifest(3, 5), TrainConfig(train_batch_size=2), world=1) == 6  # 2 + 2 + 1 in each bucket
    assert batch_shapes(manifest(1, 4), TrainConfig(train_batch_size=4), world=2) == 1  # 4 split in two halves of 2

    config = Config(train=TrainConfig(compile=True))
    device = torch.device("cpu")  # compile pinned on: what the resolution reads
    assert resolved_levers(config, device, STATIC_SHAPES_BY_DEFAULT)["compile_dynamic"] is False
    assert resolved_levers(config, device, STATIC_SHAPES_BY_DEFAULT + 1)["compile_dynamic"] is None
    for value in (True, False):
        pinned = Config(train=TrainConfig(compile=True, compile_dynamic=value))
        assert resolved_levers(pinned, device, 1)["compile_dynamic"] is value
        assert resolved_levers(pinned, device, 100)["compile_dynamic"] is value
    assert resolved_levers(Config(train=TrainConfig(compile=False)), device, 1)["compile_dynamic"] is None
