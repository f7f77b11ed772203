"""`longcat-ray`: the command line. Thin: parse arguments, call one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_CLUSTER = 3  # no cluster at the address, or it cannot hold the run (training.ClusterTooSmall)
EXIT_STORAGE = 4  # output_dir's or the cache's storage failed (training.StorageFailed, cache.CacheStorageFailed)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from longcat_ray.tiny import make_tiny

    paths = make_tiny(Path(args.out), pairs=args.pairs, seed=args.seed)
    print(f"tiny model:  {paths.model}")
    print(f"data:        {paths.edits} (edits) + {paths.refs} (references), {args.pairs} pairs")
    print(f"config:      {paths.config}")
    print(f"next:        longcat-ray config check --config {paths.config}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from longcat_ray.config import ConfigError, load_config

    try:
        config, warnings = load_config(args.config)
    except ConfigError as err:
        print_warnings(err.warnings)
        print(f"{args.config}: {len(err.problems)} problem(s):", file=sys.stderr)
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    print_warnings(warnings)
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    print(f"{args.config}: OK ({len(warnings)} warning(s))", file=sys.stderr)
    return 0


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def load_or_report(path: str):
    """The config, or None after printing every problem (the caller exits 2)."""
    from longcat_ray.config import ConfigError, load_config

    try:
        config, warnings = load_config(path)
    except ConfigError as err:
        print_warnings(err.warnings)
        print(f"{path}: {len(err.problems)} problem(s):\n{err}", file=sys.stderr)
        return None
    print_warnings(warnings)
    return config


def report_dataset_error(err) -> int:
    """The dataset report of `cache` and `train`, and the way out."""
    print(f"dataset report: {err}\nFix the files above, or set \"skip_bad_pairs\": true to leave these pairs out.", file=sys.stderr)
    return EXIT_BAD_INPUT


def join_ray(address: str | None) -> bool:
    """runtime.init_ray, with an unreachable cluster reported as one line instead of a traceback."""
    from longcat_ray.runtime import init_ray

    try:
        init_ray(address)
    except ConnectionError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


def cmd_cache(args: argparse.Namespace) -> int:
    from longcat_ray.cache import CacheStorageFailed, build_cache
    from longcat_ray.pairs import DatasetError

    config = load_or_report(args.config)
    if config is None:
        return EXIT_BAD_INPUT
    if args.accelerator_type:
        config.data.cache_accelerator_type = args.accelerator_type
    if not join_ray(args.address):
        return EXIT_CLUSTER
    try:
        summary = build_cache(config, workers=args.workers)
    except DatasetError as err:
        return report_dataset_error(err)
    except CacheStorageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STORAGE
    for skipped in summary.skipped:
        print(f"skipped: {skipped}", file=sys.stderr)
    print(summary)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from longcat_ray.pairs import DatasetError
    from longcat_ray.training import ClusterTooSmall, StorageFailed, train

    config = load_or_report(args.config)
    if config is None:
        return EXIT_BAD_INPUT
    if args.workers:
        config.train.num_workers = args.workers
    if args.accelerator_type:
        config.train.accelerator_type = args.accelerator_type
    if not join_ray(args.address):
        return EXIT_CLUSTER
    try:
        result = train(config)
    except DatasetError as err:
        return report_dataset_error(err)
    except ClusterTooSmall as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CLUSTER
    except StorageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STORAGE
    print(f"trained {result.steps} steps; LoRA: {result.output_dir}/pytorch_lora_weights.safetensors "
          f"(PEFT: {result.output_dir}/adapter); last checkpoint: {result.checkpoint}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from longcat_ray.inference import EditRequest, LoraError, load_editor
    from longcat_ray.validation import validate_pairs

    if args.model_family != "longcat_image" or args.model_flavour != "edit":
        print(f"validate: model_family/model_flavour {args.model_family}/{args.model_flavour} is not supported; "
              "use --model_family longcat_image --model_flavour edit", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = load_or_report(args.config) if args.config else None
    if args.config and config is None:
        return EXIT_BAD_INPUT
    model = args.pretrained_model_name_or_path or (config.model.pretrained_model_name_or_path if config else None)
    if not model or (not config and not (args.image and args.prompt)):
        print("validate: give --config PATH, or --pretrained_model_name_or_path with --image and --prompt", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        resolutions = parse_resolution_arg(args.validation_resolution)
        loras = args.lora if args.lora is not None else default_loras(config)
        editor = load_editor(model, device=args.device, loras=loras, offload=args.offload)
    except (ValueError, LoraError) as err:
        print(f"validate: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if config:
        config.validation.resolution = resolutions
        config.validation.guidance = args.validation_guidance
        config.validation.num_inference_steps = args.validation_num_inference_steps
        config.validation.seed = args.seed
        out = args.output or f"{config.train.output_dir.rstrip('/')}/validation/cli"
        for path in validate_pairs(config, editor, out, count=config.validation.num_pairs):
            print(f"wrote {path}")
        return 0
    from PIL import Image

    from longcat_ray.images import upright_rgb

    width, height = resolutions[0]
    request = EditRequest(prompt=args.prompt, width=width, height=height, steps=args.validation_num_inference_steps,
                          guidance=args.validation_guidance, seed=args.seed, negative_prompt=args.negative_prompt)
    image = editor.edit(upright_rgb(Image.open(args.image))[0], request, preview=preview_writer(editor, args, request))
    image.save(args.output or "validation.png")
    print(f"wrote {args.output or 'validation.png'} ({image.width}x{image.height})")
    return 0


def parse_resolution_arg(value: str) -> list[tuple[int, int]]:
    from longcat_ray.config import SIZE_GRID, nearest_on_grid, parse_resolutions

    sizes = parse_resolutions(value)
    for width, height in sizes:
        if width % SIZE_GRID or height % SIZE_GRID:
            near = f"{nearest_on_grid(width, SIZE_GRID)}x{nearest_on_grid(height, SIZE_GRID)}"
            raise ValueError(f"--validation_resolution {width}x{height} is off the {SIZE_GRID}-px grid; nearest valid: {near}")
    return sizes


def default_loras(config) -> list[str]:
    """With --config and no --lora: the LoRA training exported to output_dir, if there is one."""
    import os

    from longcat_ray.export import LORA_FILE

    if config and os.path.exists(os.path.join(config.train.output_dir, LORA_FILE)):
        return [config.train.output_dir]
    return []


def preview_writer(editor, args: argparse.Namespace, request):
    """--preview_every K: decode the intermediate latents every K steps to OUTPUT.stepN.png (quarter size)."""
    if not args.preview_every:
        return None
    from longcat_ray.inference import decode_image

    stem = (args.output or "validation.png").removesuffix(".png")

    def preview(step: int, latents) -> None:
        if (step + 1) % args.preview_every == 0:
            image = decode_image(editor.pipe.vae, latents, request.width, request.height)
            image.resize((max(1, image.width // 4), max(1, image.height // 4))).save(f"{stem}.step{step + 1}.png")

    return preview


def cmd_edit(args: argparse.Namespace) -> int:
    from longcat_ray.inference import EditRequest, load_editor

    editor = load_editor(args.pretrained_model_name_or_path, device=args.device)
    width, height = (int(v) for v in args.resolution.lower().split("x"))
    request = EditRequest(
        prompt=args.prompt, width=width, height=height, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    from PIL import Image

    from longcat_ray.images import upright_rgb

    image = editor.edit(upright_rgb(Image.open(args.image))[0], request)
    image.save(args.output)
    print(f"wrote {args.output} ({image.width}x{image.height})")
    return 0


def stop_on_signal(*_) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from pydantic import ValidationError
    from ray import serve

    from longcat_ray.serving.app import run_local
    from longcat_ray.serving.config import ServeConfig

    fields = {"model": args.model, "lora_root": args.lora_root, "num_gpus": args.num_gpus, "max_replicas": args.max_replicas,
              "max_batch_size": args.max_batch_size}
    try:
        config = ServeConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        print(f"serve: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    config.api_token = config.token()  # read here, where the user's environment is
    if not join_ray(args.address):
        return EXIT_CLUSTER
    signal.signal(signal.SIGTERM, stop_on_signal)  # before deploying: a stop during the warm-up shuts down cleanly too
    try:
        url = run_local(config, args.host, args.port, args.address)
        print(f"serving {config.model} at {url}/ (page), {url}/docs (API), {url}/v1/edit; "
              f"adapters from {config.lora_root or '(none)'}; auth: {'bearer token' if config.api_token else 'off'}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        serve.shutdown()
    return 0


def add_run_options(parser: argparse.ArgumentParser, workers_help: str, accelerator_help: str) -> None:
    parser.add_argument("--config", required=True, help="path to config.json")
    parser.add_argument("--workers", type=int, default=None, help=workers_help)
    parser.add_argument("--accelerator-type", default=None, metavar="GPU", help=accelerator_help)
    add_address(parser)


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to run on: host:port of its head, or `auto` (the default, also read from "
                        "RAY_ADDRESS): join the cluster `ray start` runs on this machine, else start a local Ray")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longcat-ray",
        description="Fine-tune LongCat-Image-Edit with LoRA on Ray (Data, Train + DeepSpeed) and serve it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser(
        "make-tiny",
        help="write a tiny random-init pipeline, a synthetic paired dataset and a ready config",
        description="Write OUT/model (a tiny random-init LongCat-Image-Edit pipeline), OUT/data/{edits,refs} "
        "(synthetic pairs whose edit swaps red and blue) and OUT/config/{config,multidatabackend}.json.",
    )
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--pairs", type=int, default=12, help="number of synthetic pairs (default 12)")
    tiny.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    tiny.set_defaults(func=cmd_make_tiny)

    config = sub.add_parser("config", help="config tools").add_subparsers(dest="config_command", required=True)
    check = config.add_parser(
        "check",
        help="validate a SimpleTuner config.json and its multidatabackend.json",
        description="Print the resolved config (exit 0), or every problem found, each naming the file, the key and "
        "the fix (exit 2). Keys longcat-ray does not use are listed as warnings.",
    )
    check.add_argument("--config", required=True, help="path to config.json")
    check.set_defaults(func=cmd_config_check)

    cache = sub.add_parser(
        "cache",
        help="check the dataset and build the latent cache (Ray Data on encoder actors)",
        description="List edit/reference pairs, report every broken file (exit 2 unless skip_bad_pairs), then "
        "encode VAE latents of both images and the VL prompt embedding of (instruction, reference) for what is "
        "new or changed, on one encoder actor per GPU. Connects to RAY_ADDRESS when set, else starts a local Ray.",
    )
    add_run_options(cache, "encoder actors (default: one per GPU, 1 on CPU)",
                           "GPU model the encoder actors run on, as Ray names it (L40S, H100, ...; config key "
                           "cache_accelerator_type): an autoscaler starts nodes of that model for them")
    cache.set_defaults(func=cmd_cache)

    train = sub.add_parser(
        "train",
        help="cache what is missing, then train the LoRA on Ray Train + DeepSpeed ZeRO",
        description="SimpleTuner's `train --config`: builds the cache for what is new, then trains on one worker per "
        "GPU (2 CPU workers without GPUs), checkpointing every checkpointing_steps to output_dir and restarting "
        "from the last checkpoint when a worker dies. Re-running the same command resumes "
        "(resume_from_checkpoint: latest). The LoRA lands in output_dir/pytorch_lora_weights.safetensors.",
    )
    add_run_options(train, "training workers (default: every GPU, or 2 on CPU)",
                           "GPU model the training workers run on, as Ray names it (H100, A100-80G, ...; config key "
                           "accelerator_type): an autoscaler starts nodes of that model for them (give --workers)")
    train.set_defaults(func=cmd_train)

    validate = sub.add_parser(
        "validate",
        help="edit validation images with a base model and LoRAs (SimpleTuner's validate flags)",
        description="Either one edit (--pretrained_model_name_or_path, --image, --prompt, --output) or, with --config, a "
        "grid (reference | target | result) for each validation pair of the configured datasets. LoRAs load from "
        "safetensors only; with --config and no --lora the LoRA in output_dir is used.",
    )
    validate.add_argument("--config", help="config.json: validate its datasets' pairs")
    validate.add_argument("--model_family", default="longcat_image")
    validate.add_argument("--model_flavour", default="edit")
    validate.add_argument("--pretrained_model_name_or_path", help="pipeline folder or hub id")
    validate.add_argument("--lora", action="append", help="LoRA dir or .safetensors, optionally PATH:SCALE (repeatable)")
    validate.add_argument("--image", help="reference image to edit")
    validate.add_argument("--prompt", help="the edit instruction")
    validate.add_argument("--negative_prompt", default="")
    validate.add_argument("--validation_resolution", default="768x768", help="WIDTHxHEIGHT (16-px grid)")
    validate.add_argument("--validation_guidance", type=float, default=4.5)
    validate.add_argument("--validation_num_inference_steps", type=int, default=40)
    validate.add_argument("--seed", type=int, default=42)
    validate.add_argument("--output", help="PNG file (single edit) or folder (--config)")
    validate.add_argument("--preview_every", type=int, default=0, help="write a small decoded preview every K steps")
    validate.add_argument("--offload", default="none", choices=["none", "model", "group"],
                          help="GPU memory levers: components (model) or blocks (group) wait on the CPU")
    validate.add_argument("--device", default=None)
    validate.set_defaults(func=cmd_validate)

    edit = sub.add_parser(
        "edit",
        help="edit one image with a pipeline (the one inference path)",
        description="Edit IMAGE by PROMPT at an explicit size with the project's inference path.",
    )
    edit.add_argument("--pretrained_model_name_or_path", required=True, help="pipeline folder or hub id")
    edit.add_argument("--image", required=True, help="reference image to edit")
    edit.add_argument("--prompt", required=True, help="the edit instruction")
    edit.add_argument("--output", required=True, help="where to write the PNG")
    edit.add_argument("--resolution", default="768x768", help="WIDTHxHEIGHT on the 16-px grid (default 768x768)")
    edit.add_argument("--steps", type=int, default=40, help="denoising steps (default 40)")
    edit.add_argument("--guidance", type=float, default=4.5, help="CFG scale; 1 disables CFG (default 4.5)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    edit.set_defaults(func=cmd_edit)

    srv = sub.add_parser(
        "serve",
        help="serve the editing endpoint and web page (Ray Serve), LoRAs chosen per request",
        description="Deploy the Ray Serve app on RAY_ADDRESS's cluster or a local Ray and keep it up until Ctrl-C: "
        "GET / (page), POST /v1/edit (multipart: image, prompt, ... -> PNG), GET /v1/loras, GET /healthz, /docs. "
        "Adapters are named by id: <lora-root>/<id>/pytorch_lora_weights.safetensors (a training output_dir) or "
        "<lora-root>/<id>.safetensors. Set LONGCAT_RAY_API_TOKEN to require a bearer token. On a cluster, "
        "`serve deploy serve/config.yaml` does the same with every option.",
    )
    srv.add_argument("--model", "--pretrained_model_name_or_path", dest="model", required=True,
                     help="pipeline folder or hub id")
    srv.add_argument("--lora-root", help="folder or s3:// prefix holding adapters")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    srv.add_argument("--num-gpus", type=float, help="GPUs per model replica (default: 1 if a GPU is visible, else 0)")
    srv.add_argument("--max-replicas", type=int, help="autoscaling ceiling for model replicas (default 1)")
    srv.add_argument("--max-batch-size", type=int, help="requests per denoising batch (default 4)")
    add_address(srv)
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
