"""Training: the Ray Train driver (cache, TorchTrainer, final export) and the per-worker loop.

Ray Train owns the process group and restarts the worker group from the last reported checkpoint when a
worker dies; `zero.py` owns DeepSpeed; the data order is the reader's pure epoch plan, so a resumed run
continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import record_function

from longcat_ray import verbose
from longcat_ray.cache import CachePlan
from longcat_ray.config import Config
from longcat_ray.model.offload import ActivationOffload
from longcat_ray.profiling import StepProfiler
from longcat_ray.reader import kind_options_key as kind_key
from longcat_ray.storage import filesystem, is_url, join, write_bytes_atomic

LORA_DIR = "lora"
LOG_EVERY = 5
METRICS_LOG = "metrics-rank0.jsonl"  # under output_dir/logs: rank 0's metrics, one JSON line per logged window of steps
LEVERS_LOG = "levers-rank0.jsonl"  # under output_dir/logs: the speed settings resolved, one JSON line per start


@dataclass(kw_only=True)
class TrainResult:
    steps: int
    output_dir: str
    checkpoint: str
    metrics: dict[str, Any]


def config_hash(config: Config) -> str:
    return hashlib.sha256(config.model_dump_json(exclude={"source"}).encode()).hexdigest()[:16]


def run_name(config: Config) -> str:
    """`latest` resumes the run of the same name; a fresh start (resume null) gets a new one."""
    return "run" if config.train.resume_from_checkpoint == "latest" else f"run-{time.strftime('%Y%m%d-%H%M%S')}"


def worker_count(config: Config, gpus: int) -> int:
    """Training workers: `num_workers`, else one per GPU up (of `accelerator_type` when set; in streaming mode, per
    GPU left beside each worker's encoder actor), else 2 on a CPU-only cluster."""
    accelerator = config.train.accelerator_type
    if config.train.num_workers:
        return config.train.num_workers
    if accelerator and not gpus:
        raise ClusterTooSmall(
            f"accelerator_type is {accelerator!r} and no {accelerator} GPU is up on the cluster, so how many training "
            f"workers to ask for cannot be read from it. Fix: set num_workers (--workers N): the cluster's autoscaler "
            f"starts {accelerator} nodes for them; or an accelerator_type the cluster has (`ray status` lists its "
            "resources).")
    if not gpus:
        return 2
    share = 1 + (config.data.stream_encoder_gpus if config.data.cache_streaming else 0)
    return max(1, int(gpus // share))


DISK_FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


class StorageFailed(RuntimeError):
    """output_dir's storage failed during training: S3 stopped answering, or the disk is full (Ray Train gave up
    after its retries)."""

    def __init__(self, url: str, failure: str):
        if DISK_FULL in failure:
            what = f"a disk filled during training (output_dir is {url}): {failure}"
            fix = ("free space on the disk of the path named (each checkpoint holds the LoRA and its optimizer state; "
                   "checkpoints_total_limit keeps only the newest N)")
        else:
            what = f"the storage of output_dir {url} failed during training: {failure}"
            fix = "once the storage answers again (endpoint, credentials, network)"
        super().__init__(
            f"{what}. Checkpoints recorded before it are "
            "kept, and none that was cut short is ever resumed from (Ray Train records a checkpoint only once it is "
            f"stored whole). Fix: {fix}, then run the same command: with resume_from_checkpoint \"latest\" it resumes "
            "from the last recorded checkpoint.")


def storage_failure(text: str) -> str | None:
    """The first line of a Ray Train failure's text that reports an S3 error (pyarrow's "AWS Error ...") or a full
    disk, else None."""
    for line in text.splitlines():
        if "AWS Error" in line or DISK_FULL in line:
            return line.strip().removeprefix("OSError: ")[:400]
    return None


class ClusterTooSmall(RuntimeError):
    """The cluster cannot hold the run's plan and no autoscaler can add what is missing."""


OFFLOAD_CPUS = 8  # a GPU worker's CPUs with offload_optimizer: cpu (Ray gives the worker as many OpenMP threads)


def worker_resources(gpu: bool, accelerator_type: str | None = None, offload: bool = False) -> dict[str, float]:
    """One training worker's placement-group bundle (Ray Train's: one CPU, and with `gpu` its GPU, of that model when
    set; OFFLOAD_CPUS CPUs where the optimizer steps on the host)."""
    from longcat_ray.runtime import accelerator_resource

    if not gpu:
        return {"CPU": 1}
    return {"CPU": OFFLOAD_CPUS if offload else 1, "GPU": 1, **accelerator_resource(accelerator_type)}


def reader_resources(config: Config, gpus: int) -> dict[str, float]:
    """What each worker's data reader needs beside the worker: cached, a CPU for its read tasks (they run outside
    the workers' placement group, so workers holding every CPU would starve them: a silent hang); streaming, its own
    encoder actor (its decode tasks take whichever CPU is free)."""
    from longcat_ray.cache import encoder_actor_resources
    from longcat_ray.reader import READER_CPUS

    if not config.data.cache_streaming:
        return {"CPU": READER_CPUS}
    return encoder_actor_resources(config.data.stream_encoder_gpus if gpus else 0)


def check_cluster_fits(bundle: dict[str, float], reader: dict[str, float], workers: int) -> None:
    """Refuses, before anything starts, a plan the cluster cannot hold now and its autoscaler cannot grow to: each
    worker's bundle and its reader. Fits on the cluster's total or, with an autoscaler, on the most its node groups
    can add; without one, a node must hold a bundle."""
    import ray
    from ray._private.state import state

    need = {key: workers * (bundle.get(key, 0) + reader.get(key, 0)) for key in {*bundle, *reader}}
    total = ray.cluster_resources()
    ceiling = state.get_max_resources_from_cluster_config() or {}  # an autoscaler's node groups, when there is one
    room = {key: max(total.get(key, 0), ceiling.get(key, 0)) for key in need}
    per = " + ".join(f"{value:g} {key}" for key, value in bundle.items())
    beside = " + ".join(f"{value:g} {key}" for key, value in reader.items() if value)
    short = [f"{key} {value:g} needed, {room[key]:g} in the cluster" for key, value in need.items() if value > room[key]]
    if short:
        raise ClusterTooSmall(
            f"training needs {workers} workers x ({per}) and beside each its data reader ({beside}): {', '.join(short)}, "
            "and no autoscaler can add more. Fix: fewer workers (--workers / \"num_workers\"), or a cluster with more "
            "CPUs/GPUs (`ray start --head --num-cpus N`, a bigger node, or an autoscaler config whose node groups can add "
            "them); streaming: a lower stream_encoder_gpus, or cache first (cache_streaming: false).")
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not ceiling and not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
        raise ClusterTooSmall(
            f"each training worker needs {per} on one node; no node of the cluster has that ("
            + "; ".join(f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" for node in nodes)
            + "). Fix: give the GPU nodes CPUs (`ray start --num-cpus N`), or add a node that has them.")


def validation_pairs(manifest: list[dict[str, Any]], config: Config) -> list[dict[str, Any]]:
    """The samples in-training validation renders: the first `num_pairs` by sample id (of `eval_dataset_id`)."""
    from longcat_ray.pairs import evaluation_rows

    if not config.validation.steps:
        return []
    return evaluation_rows(manifest, config)[: config.validation.num_pairs]


def prepare_data(config: Config, progress: bool) -> list[dict[str, Any]]:
    """-> the manifest training reads. Cached mode: build the cache. Streaming: check the dataset and cache only
    the validation pairs; the manifest rows carry the image URLs the workers' encoders read."""
    from longcat_ray.cache import STREAM_KEYS, build_cache, cache_pairs, make_plan, manifest_rows, read_manifest
    from longcat_ray.pairs import count_fates, prepare_pairs

    if not config.data.cache_streaming:
        print(build_cache(config, progress=progress))
        return read_manifest(config)
    pairs, problems, fates = prepare_pairs(config)
    plan = make_plan(config)
    rows = manifest_rows(pairs, plan, STREAM_KEYS)
    chosen = {m["sample_id"] for m in validation_pairs(rows, config)}
    summary = cache_pairs([p for p in pairs if p["sample_id"] in chosen], plan, progress=progress)
    skipped = "".join(f"\n  skipped: {p}" for p in problems)
    print(f"streaming {len(pairs)} pairs ({len(problems)} skipped; {count_fates(fates)}); validation pairs cached: {summary}{skipped}")
    return rows


def train(config: Config, progress: bool = True) -> TrainResult:
    """Prepare the data (cache or stream), train on Ray Train + DeepSpeed, export the final LoRA to output_dir."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from longcat_ray.cache import make_plan
    from longcat_ray.run_record import recover
    from longcat_ray.runtime import gpus_up

    accelerator = config.train.accelerator_type
    gpus = gpus_up(accelerator)
    workers = worker_count(config, gpus)
    gpu_plan = gpus > 0 or accelerator is not None
    bundle = worker_resources(gpu_plan, accelerator, config.train.offload_optimizer == "cpu")
    if accelerator and gpus < workers:
        print(f"ray: {gpus} {accelerator} GPUs up, {workers} to train on: waiting for the cluster's autoscaler to start "
              "the rest (`ray status` shows them launching)", file=sys.stderr, flush=True)
    else:  # before the cache stage: a plan that cannot run is refused at once
        check_cluster_fits(bundle, reader_resources(config, gpu_plan), workers)
    manifest = prepare_data(config, progress)
    resume = config.train.resume_from_checkpoint
    resume_from = resume if resume and resume != "latest" else None  # a checkpoint's path or URL
    if resume == "latest" and (recovered := recover(config.train.output_dir, run_name(config))):
        resume_from = f"s3://{recovered}" if config.train.output_dir.startswith("s3://") else recovered
    trainer = TorchTrainer(
        train_loop,
        torch_config=worker_device_torch_config(),
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "manifest": manifest,
            "plan": make_plan(config),
            "progress": progress,
            "resume_from": resume_from,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu_plan, resources_per_worker=bundle,
                                     placement_strategy=config.train.placement_strategy),
        run_config=RunConfig(
            # with a filesystem given, Ray wants the path inside it ("bucket/key"): "s3://..." failed in Ray's storage check
            storage_path=config.train.output_dir.removeprefix("s3://"),
            name=run_name(config),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            # Ray Train's INFO lines (resources asked, worker group started, each checkpoint reported) stay in its log
            # files; its warnings and errors (a worker lost, a restart) show
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.checkpoints_total_limit),
            storage_filesystem=storage_filesystem(config.train.output_dir),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 -- re-raised as it came unless the storage failed
        failure = storage_failure(str(err))
        if failure and (is_url(config.train.output_dir) or DISK_FULL in failure):
            raise StorageFailed(config.train.output_dir, failure) from err
        raise
    checkpoint = result.checkpoint
    copy_export(checkpoint, config.train.output_dir)
    return TrainResult(steps=int(result.metrics["step"]), output_dir=config.train.output_dir, checkpoint=checkpoint.path, metrics=result.metrics)


def storage_filesystem(url: str):
    """pyarrow filesystem for s3:// output dirs (Ray Train's storage layer is pyarrow's)."""
    if not url.startswith("s3://"):
        return None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return pyarrow.fs.S3FileSystem(endpoint_override=endpoint) if endpoint else pyarrow.fs.S3FileSystem()


def copy_export(checkpoint, output_dir: str) -> None:
    """The final checkpoint's exported LoRA -> output_dir (pytorch_lora_weights.safetensors, adapter/); storage
    that fails on the way is StorageFailed (each file lands whole or not at all: write_bytes_atomic)."""
    fs, root = filesystem(output_dir)
    try:
        with checkpoint.as_directory() as local:
            for dirpath, _, files in os.walk(os.path.join(local, LORA_DIR)):
                for name in files:
                    source = os.path.join(dirpath, name)
                    relative = os.path.relpath(source, os.path.join(local, LORA_DIR))
                    with open(source, "rb") as handle:
                        write_bytes_atomic(fs, join(root, relative), handle.read())
    except OSError as err:
        if not is_url(output_dir) and err.errno != errno.ENOSPC:
            raise
        raise StorageFailed(output_dir, f"{err} (copying the trained LoRA from {checkpoint.path})") from err


# ---- the worker ------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class WorkerState:
    """What a checkpoint restores besides the weights: optimizer steps done and micro-batches consumed."""

    step: int = 0
    micro_step: int = 0


def train_loop(loop_config: dict[str, Any]) -> None:
    """Per worker: model + LoRA + DeepSpeed engine, resume, then micro-batches from the epoch plan."""
    try:
        run_worker(loop_config)
    except Exception as err:
        sent = sendable(err)
        if sent is err:
            raise
        raise sent from None


def sendable(err: Exception) -> Exception:
    """`err`, or a RuntimeError with its type, message and traceback when Ray cannot pickle it back to the driver
    (an InductorError holds a frame: the user would read only "cannot pickle 'frame' object")."""
    import traceback

    from ray import cloudpickle

    try:
        cloudpickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 -- whatever stops the pickling, the text still travels
        return RuntimeError("".join(traceback.format_exception(err)).rstrip())


def run_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from longcat_ray.zero import load_checkpoint

    started = time.perf_counter()
    quiet_worker_reports()
    config = Config.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = torch.device("cuda", context.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if config.train.mixed_precision == "bf16" else torch.float32
    levers = resolved_levers(config, device, batch_shapes(loop_config["manifest"], config.train, world))
    if rank == 0:
        print(f"training on {world} x {device.type}: " + ", ".join(f"{k} {v}" for k, v in levers.items()), flush=True)
    if device.type == "cpu" and ray.get_gpu_ids():
        print(f"rank {rank} holds Ray GPU {ray.get_gpu_ids()} but torch sees no CUDA device: training on the CPU "
              "(expected on Ray's fake test nodes; on a real cluster check the node's NVIDIA driver)", flush=True)
    engine, params, scheduler = build_model(config, levers, world, device, dtype)
    offload = ActivationOffload(engine.module) if levers["offload_activations"] == "cpu" else None
    state = WorkerState()
    checkpoint = first_checkpoint(loop_config["resume_from"])
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = WorkerState(**load_checkpoint(engine, directory)["longcat_ray"])
    loop = TrainingLoop(config=config, engine=engine, params=params, scheduler=scheduler, rank=rank, world=world,
                        device=device, dtype=dtype, state=state, manifest=loop_config["manifest"],
                        plan=loop_config["plan"], progress=loop_config["progress"], offload=offload, levers=levers,
                        started=started)
    loop.run()


def quiet_worker_reports() -> None:
    """Ray Train's "Reporting training result N: TrainingReport(...)" INFO line, one per rank and checkpoint, off the
    console (its logger is named by its file's path, outside `ray.train`, so RunConfig's log level misses it)."""
    from ray.train.v2._internal.execution import context

    if not verbose():
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def first_checkpoint(resume_from: str | None):
    """The checkpoint a worker starts from: the newest Ray Train recorded for this run (after a restart), else the
    one `resume_from` names (resume_from_checkpoint set to a path, or the one run_record.recover chose), else None.
    (Ray's own `resume_from_checkpoint` argument does the same but is deprecated, ray-project/ray#49454.)"""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint or not resume_from:
        return checkpoint
    fs = storage_filesystem(resume_from)
    return ray.train.Checkpoint(resume_from.removeprefix("s3://"), filesystem=fs) if fs else ray.train.Checkpoint(resume_from)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def worker_device_torch_config():
    """Ray Train's TorchConfig with the process group's backend picked on the workers: NCCL where they see CUDA, gloo
    where they do not. A worker can hold a Ray `GPU` with no CUDA device behind it (the logical GPUs of Ray's fake
    multi-node clusters in tests/test_jobs.py; a node whose driver failed): NCCL would stop there with "no GPUs
    found", while the worker trains on its CPU and says so in its first line."""
    import dataclasses

    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class WorkerDeviceBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            backend = "nccl" if worker_group.execute_single(0, has_cuda) else "gloo"
            super().on_start(worker_group, dataclasses.replace(backend_config, backend=backend))

    class WorkerDeviceTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return WorkerDeviceBackend

    return WorkerDeviceTorchConfig()


def resolved_levers(config: Config, device: torch.device, shapes: int) -> dict[str, Any]:
    """The speed settings this worker runs with, `auto`/null resolved for its device and, for `compile_dynamic`, the
    run's number of batch `shapes` (`batch_shapes`)."""
    from longcat_ray.config import WEIGHT_ONLY
    from longcat_ray.model.attention import resolve_backend

    train, precision = config.train, config.model.base_model_precision
    # compile cannot take torchao's weight-only tensor subclasses (the config check refuses forcing it)
    compile = train.compile if train.compile is not None else device.type == "cuda" and precision not in WEIGHT_ONLY
    budget = recompute_budget(train) if compile else None
    return {"base_model_precision": precision, "attention": resolve_backend(train.attention, device), "compile": compile,
            "compile_wrapper": train.compile_wrapper if compile else None,
            "compile_dynamic": compile_dynamic(train, shapes) if compile else None, "checkpointing": checkpointing(train, budget),
            "activation_memory_budget": budget, "zero_stage": train.zero_stage, "fuse_qkv": train.fuse_qkv,
            "offload_activations": train.offload_activations,
            "cuda_graphs": (train.cuda_graphs is not False and compile and device.type == "cuda"
                            and train.offload_activations == "none")}


# `compile_dynamic: null` compiles each batch shape for its exact sizes up to this many shapes. On an H100 with two
# bucket shapes (fp8 base, through `longcat-ray train`, one call): static 0.2058 s/sample, warm-up 155 s; torch's
# default (a symbolic recompile at the second shape) 0.2307 s, 184 s. Each static shape costs its own compile and
# graph recording (the static run's first step took 71 s, its steps 2-5 with the second shape 62 s), which ~0.025 s
# per step pays back after ~2500 steps; past 4 shapes torch's default stays (a guess: 4 and 8 buckets not measured).
STATIC_SHAPES_BY_DEFAULT = 4


def compile_dynamic(train, shapes: int) -> bool | None:
    """The compiled blocks' `dynamic`: the configured value, else static (False) for a run of at most
    STATIC_SHAPES_BY_DEFAULT batch shapes, else torch's default (None)."""
    if train.compile_dynamic is not None:
        return train.compile_dynamic
    return False if shapes <= STATIC_SHAPES_BY_DEFAULT else None


def batch_shapes(manifest: list[dict[str, Any]], train, world: int) -> int:
    """How many distinct batch shapes (bucket and batch length) the run's first epoch feeds the model, all ranks
    together (the compiled blocks see one shape per bucket and batch length; a later epoch's split batches may add a
    few)."""
    from longcat_ray.reader import plan_epoch

    ranks = plan_epoch(manifest, train.train_batch_size, world, train.seed, 0)
    return len({(batch[0]["bucket_w"], batch[0]["bucket_h"], len(batch)) for batches in ranks for batch in batches})


def checkpointing(train, budget: float | None) -> str:
    """What recomputes in the backward, in words (the worker's first log line)."""
    if budget is not None:
        return f"compiler, {budget:g} of the activations"
    if not train.gradient_checkpointing:
        return "off"
    every = train.gradient_checkpointing_interval or 1
    return "every block" if every == 1 else f"1 block in {every}"


# Under compile, `gradient_checkpointing` alone means the compiler's recomputation at this budget: on an H200 (fp8
# base, 768², through `longcat-ray train`, one machine) 0 -> 0.2774 s/sample at 8.16 GiB, 0.1 -> 0.2746 s at 9.18 GiB:
# who turns checkpointing on wants the memory. Whole-block checkpointing under compile was measured only in a
# plain-loop probe (bf16 base): 0.311 s at 13.6 GiB (benchmarks/RESULTS.md)
CHECKPOINTING_BUDGET = 0.0


def recompute_budget(train) -> float | None:
    """The compiled blocks' activation memory budget: the configured one, else CHECKPOINTING_BUDGET when
    checkpointing is on without an interval (an interval asks for whole blocks, every N-th)."""
    if train.activation_memory_budget is not None:
        return train.activation_memory_budget
    if train.gradient_checkpointing and train.gradient_checkpointing_interval in (None, 1):
        return CHECKPOINTING_BUDGET
    return None


def build_model(config: Config, levers: dict[str, Any], world: int, device: torch.device, dtype: torch.dtype):
    """-> (DeepSpeed engine, LoRA parameters, lr scheduler): the DiT loaded on the CPU with its adapter (initialised
    there: the same on any machine), moved to the device block by block (fp8-matmul converting each block as it
    arrives), placed by DeepSpeed, torchao's weight-only base quantized, then the speed levers (`resolved_levers`)
    applied (model/transformer.py)."""
    from longcat_ray.model.transformer import (add_lora, checkpoint_blocks, load_transformer, place_base, quantize_base,
                                               speed_up_training)
    from longcat_ray.zero import frozen_weights_replaceable, init_engine

    train, precision = config.train, levers["base_model_precision"]
    transformer = load_transformer(config.model, dtype, torch.device("cpu"))
    budget = levers["activation_memory_budget"]  # the compiler's recomputation replaces whole-block checkpointing
    checkpoint_blocks(transformer, train.gradient_checkpointing and budget is None, train.gradient_checkpointing_interval)
    params = add_lora(transformer, config.lora, train.seed)
    place_base(transformer, precision, device)
    engine, scheduler = init_engine(transformer, params, train, world)
    with frozen_weights_replaceable(engine):
        quantize_base(transformer, precision)
    speed_up_training(transformer, levers["attention"], levers["compile"], cpp_wrapper=levers["compile_wrapper"] == "cpp",
                      memory_budget=budget, fuse_qkv=levers["fuse_qkv"], cuda_graphs=levers["cuda_graphs"],
                      dynamic=levers["compile_dynamic"])
    return engine, params, scheduler


class NonFiniteLoss(RuntimeError):
    """The loss became inf/nan: the weights are no longer trustworthy, so nothing after it is checkpointed."""


def check_finite(losses: list[float], step: int, steps: int) -> None:
    """Stop the run at the first window with a non-finite loss (DeepSpeed's per-step overflow check is off)."""
    bad = [i for i, loss in enumerate(losses) if not math.isfinite(loss)]
    if bad:
        raise NonFiniteLoss(
            f"the loss became {losses[bad[0]]} within steps {step - steps + 1}-{step}: the run stops before anything "
            "after it is checkpointed. Resume from the last checkpoint (re-run the same command) with a lower "
            "learning_rate or max_grad_norm, and check the data those steps read (logs/samples-rank*.jsonl)."
        )


@dataclass(kw_only=True)
class Window:
    """The steps since the last log line: their losses kept on the device (read once per window, so the host
    never waits for the GPU step by step), samples, and when the window opened."""

    losses: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0
    samples: int = 0
    opened: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.losses.append(loss.detach().float())
        self.samples += samples


@dataclass(kw_only=True)
class TrainingLoop:
    config: Config
    engine: Any
    params: list
    scheduler: Any
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    state: WorkerState
    manifest: list[dict[str, Any]]
    plan: CachePlan
    progress: bool
    offload: ActivationOffload | None = None
    """Where the forward's saved activations wait for the backward (`offload_activations: cpu`); None: the device."""
    levers: dict[str, Any] = field(default_factory=dict)
    """The speed settings this run resolved (`resolved_levers`): rank 0 logs them once per start."""

    @property
    def cuda_graphs(self) -> bool:
        """Mark each micro-step a new CUDA-graph generation and validate eagerly (`resolved_levers`' `cuda_graphs`)."""
        return bool(self.levers.get("cuda_graphs"))
    started: float = field(default_factory=time.perf_counter)

    def run(self) -> None:
        from longcat_ray.reader import SEGMENT

        train = self.config.train
        self.writer, self.window, self.last = self.open_logs(), Window(), {}
        if self.rank == 0:  # one line per start: a resumed run's settings follow the first run's
            self.append_log(LEVERS_LOG, {"step": self.state.step, **self.levers})
        self.profiler = StepProfiler(train.profile_steps if self.rank == 0 else None, self.device, self.log_dir())
        self.setup_s = time.perf_counter() - self.started
        self.setup_peak_gib = 0.0
        if self.device.type == "cuda":  # peak_gib then tells what training holds, not the load before quantization
            self.setup_peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        end = train.max_train_steps * train.gradient_accumulation_steps  # micro-steps
        while self.state.step < train.max_train_steps:
            self.run_segment(self.state.micro_step, min(self.state.micro_step + SEGMENT, end))
        self.profiler.at_step(self.state.step)  # a profile that ends on the last step
        if self.state.step % train.checkpointing_steps:
            self.checkpoint(self.metrics())  # the final state is always a checkpoint

    def run_segment(self, start: int, stop: int) -> None:
        """Micro-steps `start`..`stop - 1` through one reader pipeline."""
        from longcat_ray.reader import prefetch, stall_report

        train = self.config.train
        batches = (self.step_inputs(start + i, *batch) for i, batch in enumerate(self.read_batches(start, stop)))
        for sample_ids, inputs in prefetch(batches, depth=2, stall_timeout_s=train.stall_timeout_s, explain=stall_report):
            self.log_samples(sample_ids)
            self.profiler.at_step(self.state.step)
            self.train_micro_batch(inputs)
            if self.state.micro_step % train.gradient_accumulation_steps == 0:
                self.after_step()
                if self.state.step >= train.max_train_steps:
                    break

    def read_batches(self, start: int, stop: int) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """This rank's planned batches of micro-steps `start`..`stop - 1`: read from the cache, or encoded on the fly."""
        from longcat_ray.reader import batch_tensors, group_encoded, planned_batches, shard_dataset, stream_dataset

        train, data = self.config.train, self.config.data
        batches = planned_batches(self.manifest, train.train_batch_size, self.world, train.seed, self.rank, start, stop)
        if data.cache_streaming:
            gpus = data.stream_encoder_gpus if torch.cuda.is_available() else 0
            yield from group_encoded(stream_dataset(batches, self.plan, gpus).iter_rows())
            return
        for row in shard_dataset(batches, self.plan.options).iter_rows():
            yield json.loads(row["sample_ids"]), batch_tensors(row)

    def step_inputs(self, micro_step: int, sample_ids: list[str], tensors: dict[str, torch.Tensor]):
        """-> (sample ids, host inputs of micro-step `micro_step`): latents, the prompt rows after caption dropout
        and the step's random draws, from a generator seeded by (seed, micro-step, rank). Runs on the prefetch
        thread, so the training thread only queues uploads and kernels."""
        from longcat_ray.model.loss import choose_prompts, draw_step

        train = self.config.train
        generator = torch.Generator().manual_seed(train.seed * 1_000_003 + micro_step * 1009 + self.rank)
        # caption dropout picks rows on the host: only the chosen embedding is copied to the device
        prompts = choose_prompts(tensors["text"], tensors.get("blank"), train.caption_dropout_probability, generator)
        draws = draw_step(tensors["edit"].shape, prompts.shape[1], generator)
        return sample_ids, {"edit": tensors["edit"], "ref": tensors["ref"], "text": prompts, **draws}

    def train_micro_batch(self, inputs: dict[str, torch.Tensor]) -> None:
        """One forward/backward/step of `step_inputs`' output, queued on the device; the loss stays there (Window)."""
        from longcat_ray.model.loss import flow_matching_loss, to_device
        from longcat_ray.model.transformer import graph_step_begin

        move = lambda t: to_device(t, self.device, self.dtype)  # noqa: E731
        if self.cuda_graphs:
            graph_step_begin(self.params)
        saving = self.offload.saving() if self.offload else contextlib.nullcontext()
        with record_function("lcr:forward"), saving:  # phases named in a profile's trace (StepProfiler)
            loss = flow_matching_loss(self.engine, move(inputs["edit"]), move(inputs["ref"]), move(inputs["text"]), inputs)
        with record_function("lcr:backward"):
            self.engine.backward(loss)
        with record_function("lcr:step"):
            self.engine.step()
        self.state.micro_step += 1
        self.window.add(loss, inputs["edit"].shape[0])

    def after_step(self) -> None:
        self.state.step += 1
        self.window.steps += 1
        log = self.state.step % LOG_EVERY == 0 or self.state.step == 1
        checkpoint = self.state.step % self.config.train.checkpointing_steps == 0
        if log or checkpoint:
            metrics = self.metrics()
            if self.rank == 0 and log:
                self.log(metrics)
        if self.config.validation.steps and self.state.step % self.config.validation.steps == 0:
            self.validate()
        if checkpoint:
            self.checkpoint(metrics)
        if not self.window.losses:  # validation and checkpoint time stays out of the next window's s/step
            self.window.opened = time.perf_counter()

    def metrics(self) -> dict[str, Any]:
        """Closes the window (one host-device sync) -> this rank's metrics of it; later calls without new steps
        repeat the last."""
        window = self.window
        if not window.losses:
            return self.last or {"step": self.state.step, "loss": float("nan"), "lr": self.scheduler.get_last_lr()[0]}
        losses = torch.stack(window.losses).tolist()  # the sync
        seconds = time.perf_counter() - window.opened
        check_finite(losses, self.state.step, window.steps)
        self.last = {
            "step": self.state.step,
            "loss": sum(losses) / len(losses),
            "losses": losses,
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": window.samples * self.world / seconds,
            "step_time_s": seconds / max(1, window.steps),
            "workers": self.world,
            "window_steps": window.steps,
            "elapsed_s": time.perf_counter() - self.started,
            "setup_s": self.setup_s,
            "setup_peak_gib": self.setup_peak_gib,
            "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0,
            # between steps: the base, the LoRA with its gradients and optimizer state (peak - resident = one step's
            # activations and temporaries)
            "resident_gib": torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0,
            **self.offloaded_gib(window.steps),
        }
        self.window = Window()
        if self.rank == 0:  # every window, logged or closed by a checkpoint: the JSON log holds every step's loss
            self.append_log(METRICS_LOG, self.last)
        return self.last

    def offloaded_gib(self, steps: int) -> dict[str, float]:
        """{"offloaded_gib_per_step": host copies of saved activations per step in the window} with
        `offload_activations`, else {}."""
        if not self.offload:
            return {}
        moved, self.offload.moved_bytes = self.offload.moved_bytes, 0
        return {"offloaded_gib_per_step": moved / max(1, steps) / 2**30}

    def validate(self) -> None:
        """Every rank samples (ZeRO-3 needs all of them in each forward); rank 0 writes the grid."""
        import numpy as np

        from longcat_ray.cache import entry_tensor, require_entry
        from longcat_ray.validation import save_png, validate_cached

        if not hasattr(self, "vae"):
            from diffusers import AutoencoderKL

            model = self.config.model
            self.vae = AutoencoderKL.from_pretrained(model.pretrained_model_name_or_path, subfolder="vae",
                                                     revision=model.revision, dtype=self.dtype).to(self.device).eval()
        options = self.plan.options
        samples = [{k: entry_tensor(k, require_entry(u, options[kind_key(k, m)], m["sample_id"])) for k, u in m["entries"].items()}
                   for m in validation_pairs(self.manifest, self.config)]
        module = self.engine.module
        module.eval()
        # with CUDA graphs the compiled blocks replay a training step's tree; validation runs them eagerly instead
        with torch.compiler.set_stance("force_eager" if self.cuda_graphs else "default"):
            grid = validate_cached(module, self.vae, samples, self.config)
        module.train()
        if self.rank == 0:
            url = join(self.config.train.output_dir, "validation", f"step_{self.state.step:06d}.png")
            save_png(grid, url)
            if self.writer:
                self.writer.add_image("validation", np.asarray(grid), self.state.step, dataformats="HWC")
            print(f"validation grid: {url}", flush=True)

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Collective: every rank saves its shard and reports it; rank 0 adds the exported LoRA."""
        import ray.train

        from longcat_ray.export import export_lora
        from longcat_ray.run_record import write_manifest
        from longcat_ray.zero import gathered, save_checkpoint

        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(self.engine, directory, {"longcat_ray": self.state.__dict__.copy()})
            with gathered(self.params, self.config.train.zero_stage):
                if self.rank == 0:
                    export_lora(self.engine.module, os.path.join(directory, LORA_DIR), {}, self.export_meta(),
                                comfyui=self.config.lora.format == "comfyui")
            write_manifest(directory, self.rank, self.world, self.state.step)  # what "stored whole" means (run_record)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def export_meta(self) -> dict[str, Any]:
        lora = self.config.lora
        return {
            "base_model": self.config.model.pretrained_model_name_or_path,
            "rank": lora.rank,
            "alpha": lora.alpha or lora.rank,
            "target_modules": list(lora.target_modules),
            "steps": self.state.step,
            "config_hash": config_hash(self.config),
        }

    def open_logs(self):
        """Rank 0's TensorBoard writer under output_dir/logs (local output dirs; s3 runs log beside the job)."""
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package; tensorboardX (Ray's) writes the same files
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("warning: neither tensorboard nor tensorboardX is installed: metrics go to "
                      f"output_dir/logs/{METRICS_LOG} only", flush=True)
                return None
        out = self.config.train.output_dir
        logdir = os.path.join(out, "logs") if not is_url(out) else os.path.join(tempfile.gettempdir(), "longcat-ray-logs")
        return SummaryWriter(logdir)

    def log(self, metrics: dict[str, Any]) -> None:
        train = self.config.train
        print(
            f"step {metrics['step']}/{train.max_train_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
            f"{metrics['samples_per_s']:.2f} samples/s  {metrics['step_time_s']:.3f} s/step"
            + (f"  peak {metrics['peak_gib']:.1f} GiB" if self.device.type == "cuda" else ""),
            flush=True,
        )
        if self.writer:
            for key, value in metrics.items():
                if key not in ("step", "losses"):
                    self.writer.add_scalar(f"train/{key}", value, metrics["step"])
            self.writer.flush()

    def log_samples(self, sample_ids: list[str]) -> None:
        """Which samples each micro-batch trained on: lets a resumed run be audited against the plan."""
        self.append_log(f"samples-rank{self.rank}.jsonl", {"micro_step": self.state.micro_step, "samples": sample_ids})

    def log_dir(self) -> str | None:
        """output_dir/logs when output_dir is local (s3 runs keep their JSON logs off)."""
        out = self.config.train.output_dir
        return None if is_url(out) else os.path.join(out, "logs")

    def append_log(self, name: str, record: dict[str, Any]) -> None:
        """One JSON line under output_dir/logs (local output dirs only)."""
        directory = self.log_dir()
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, name), "a") as handle:
            handle.write(json.dumps(record) + "\n")
