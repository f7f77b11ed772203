"""Removes each protection RELIABILITY.md relies on, one at a time, and runs the tests that show it: every one must fail.

    .venv/bin/python scripts/check_protections.py            # all (about 23 minutes on 2 cores)
    .venv/bin/python scripts/check_protections.py resume nan # by name; --list shows them

Each protection is a textual change to one source file (the exact text replaced, so a refactor that moves the code
makes the check stop with "text not found" instead of silently testing nothing), made in a throwaway git worktree of
HEAD, never in this checkout. A protection whose tests still pass is reported and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Protection:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# the runs interrupted mid-way (driver killed; node lost then job stopped) that must end as the uninterrupted run
INTERRUPTED = ("tests/test_training.py::test_a_killed_driver_and_the_same_command_again_end_as_the_uninterrupted_run",
               "tests/test_node_loss.py::test_a_lost_node_then_a_stopped_job_and_the_run_ends_as_if_neither_happened")
BATTERY = "tests/test_pairs.py::test_the_input_battery_gets_its_documented_outcomes_and_every_file_is_counted_once"
PROTECTIONS = [
    # a worker group Ray Train restarts, and the same command or job run again (the same run name under output_dir),
    # start from the run's last recorded checkpoint, which Ray Train hands each worker
    Protection("resume", "an interrupted run resumes from Ray Train's last checkpoint", "longcat_ray/training.py",
               "    checkpoint = ray.train.get_checkpoint()\n", "    checkpoint = None\n", INTERRUPTED),
    Protection("nan", "a non-finite loss stops the run", "longcat_ray/training.py",
               "    if bad:\n        raise NonFiniteLoss(", "    if False:\n        raise NonFiniteLoss(",
               ("tests/test_training.py::test_a_non_finite_loss_stops_the_run_naming_the_steps",)),
    Protection("sendable", "worker errors Ray cannot pickle travel as text", "longcat_ray/training.py",
               "    try:\n        cloudpickle.dumps(err)\n        return err\n",
               "    try:\n        return err\n",
               ("tests/test_training.py::test_a_worker_error_ray_cannot_pickle_reaches_the_driver_as_text",)),
    Protection("fits", "a plan the cluster cannot hold is refused before anything starts", "longcat_ray/training.py",
               "    if short:\n        raise ClusterTooSmall(", "    if False:\n        raise ClusterTooSmall(",
               ("tests/test_training.py::test_the_plan_counts_each_readers_needs_and_refuses_what_cannot_run",)),
    Protection("lora_id", "LoRA ids are bare names under the adapter root", "longcat_ray/serving/adapters.py",
               '    return bool(LORA_ID.fullmatch(name)) and ".." not in name', "    return True",
               ("tests/serving/test_uploads.py::test_lora_ids_never_leave_the_root",)),
    Protection("links", "adapters that are links out of the root are refused", "longcat_ray/serving/adapters.py",
               "    real_root = os.path.realpath(root)\n", "    return True\n",
               ("tests/serving/test_uploads.py::test_links_out_of_the_root_are_not_served",)),
    Protection("minimum", "edits below minimum_image_size are left out and listed", "longcat_ray/pairs.py",
               "    if not minimum:\n        return True\n", "    if True:\n        return True\n",
               ("tests/test_pairs.py::test_small_edits_are_left_out_and_listed_without_stopping_the_run",)),
    Protection("broken", "an unreadable image is named in the report, not a traceback", "longcat_ray/pairs.py",
               "    except Exception as err:  # noqa: BLE001 -- PIL raises many types for corrupt data\n",
               "    except ZeroDivisionError as err:\n",
               ("tests/test_pairs.py::test_report_names_every_broken_file", BATTERY)),
    Protection("bomb", "an image whose header promises over PIL's pixel limit is refused before decoding", "longcat_ray/pairs.py",
               '            warnings.simplefilter("error", Image.DecompressionBombWarning)\n', "            pass\n", (BATTERY,)),
    Protection("twins", "two images of one name (a.png, a.jpg) are named, never paired at random", "longcat_ray/pairs.py",
               "    return {stem: same[0] for stem, same in urls.items() if len(same) == 1}, {s: u for s, u in urls.items() if len(u) > 1}\n",
               "    return {stem: same[0] for stem, same in urls.items()}, {}\n", (BATTERY,)),
    Protection("case", "names that differ only in case are said to", "longcat_ray/pairs.py",
               '    return f"; {twins[0]} differs only in case (names match exactly)" if twins else ""\n', '    return ""\n',
               (BATTERY,)),
    Protection("utf8", "a caption that is not UTF-8 is named", "longcat_ray/pairs.py",
               '        text = read_bytes(url, options).decode("utf-8").strip()\n',
               '        text = read_bytes(url, options).decode("utf-8", "replace").strip()\n', (BATTERY,)),
    Protection("empty_caption", "an empty caption is named", "longcat_ray/pairs.py",
               "    if not text:  # an edit without", "    if False:  # an edit without", (BATTERY,)),
    Protection("smaller_ref", "a reference far smaller than its edit is named", "longcat_ray/pairs.py",
               "    if edit is None or ref is None or not (", "    if True or edit is None or ref is None or not (", (BATTERY,)),
    Protection("checksum", "a cache entry with a flipped byte never reaches training", "longcat_ray/cache.py",
               '    if meta.get("format") != CACHE_FORMAT or meta.get("checksum") != tensor_checksum(tensors):\n',
               '    if meta.get("format") != CACHE_FORMAT:\n',
               ("tests/test_reader.py::test_a_damaged_cache_entry_never_reaches_a_training_step[flip]",)),
    Protection("entry_sample", "another sample's valid entry under this one's name never reaches training",
               "longcat_ray/cache.py", '    if sample_id is not None and meta.get("sample_id") != sample_id:\n', "    if False:\n",
               ("tests/test_reader.py::test_a_damaged_cache_entry_never_reaches_a_training_step[swap]",)),
    Protection("encoder_key", "text entries are keyed by the text encoder's fingerprint", "longcat_ray/cache.py",
               "        text_fp=text_fp,\n", '        text_fp="any encoder",\n',
               ("tests/test_cache.py::test_cache_build_reuse_and_exact_invalidation",)),
    Protection("cache_storage", "the cache's storage failing mid-write stops the build with one message", "longcat_ray/cache.py",
               '    """A failed Ray Data run whose text carries write_batch\'s line -> the error to raise, else None."""\n',
               '    """A failed Ray Data run whose text carries write_batch\'s line -> the error to raise, else None."""\n'
               "    return None\n", ("tests/test_cache.py::test_cache_on_s3_and_the_storage_going_away_mid_write",)),
    Protection("gpu_plan", "training workers ask for GPUs (so they never land on the GPU-less head)",
               "longcat_ray/training.py", "    gpu_plan = gpus > 0 or accelerator is not None\n", "    gpu_plan = False\n",
               ("tests/test_jobs.py::test_aws_node_types_autoscale_for_the_cache_train_and_validate_jobs",)),
    Protection("h100_type", "cluster/aws.yaml's H100 type holds a training worker (this check waits the test's 420 s)",
               "cluster/aws.yaml", "    resources: {}\n  gpu_1x_l40s:", '    resources: {"GPU": 0}\n  gpu_1x_l40s:',
               ("tests/test_jobs.py::test_aws_node_types_autoscale_for_the_cache_train_and_validate_jobs",)),
    Protection("length", "a Content-Length over the limit is refused before the body is read",
               "longcat_ray/serving/body_limit.py", "        if limit is not None and length.isdigit() and int(length) > limit:\n",
               "        if False:\n", ("tests/serving/test_app.py::test_a_content_length_over_the_limit_is_refused_before_the_body",)),
    Protection("upload_pixels", "an upload over max_input_pixels is refused from its header, before decoding",
               "longcat_ray/serving/uploads.py", "    if pixels > config.max_input_pixels:\n", "    if False:\n",
               ("tests/serving/test_uploads.py::test_uploads_are_checked_before_decoding",
                "tests/serving/test_app.py::test_bad_input_gets_4xx_naming_the_field")),
    Protection("steps_range", "num_inference_steps outside 1..max_steps gets 422 naming it", "longcat_ray/serving/uploads.py",
               '    check_range("num_inference_steps", steps, 1, config.max_steps)\n', "",
               ("tests/serving/test_app.py::test_bad_input_gets_4xx_naming_the_field",)),
    Protection("token", "a missing or wrong bearer token gets 401", "longcat_ray/serving/app.py",
               "        if credentials is None or not secrets.compare_digest(",
               "        if False and not secrets.compare_digest(",
               ("tests/serving/test_app.py::test_bad_input_gets_4xx_naming_the_field",)),
]


def check(protection: Protection, worktree: Path) -> bool:
    """True when every one of the tests fails (not errors) with the protection removed."""
    path = worktree / protection.file
    source = path.read_text()
    if source.count(protection.old) != 1:
        sys.exit(f"{protection.name}: the text to replace is not found exactly once in {protection.file}: update "
                 "scripts/check_protections.py to the code as it is now")
    path.write_text(source.replace(protection.old, protection.new))
    try:
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *protection.tests],
                              cwd=worktree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(worktree)})
        last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
        failed = " failed" in last and "passed" not in last and "error" not in last  # every test (and case) failed
        print(f"{protection.name:13s} {'fails as it should' if failed else 'STILL PASSES'}  ({time.time() - started:.0f} s; "
              f"{last})", flush=True)
        return failed
    finally:
        path.write_text(source)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="protections to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the protections and their tests")
    args = parser.parse_args()
    chosen = [p for p in PROTECTIONS if not args.names or p.name in args.names]
    unknown = set(args.names) - {p.name for p in PROTECTIONS}
    if unknown:
        parser.error(f"unknown protection(s) {sorted(unknown)}; --list shows them")
    if args.list:
        for p in chosen:
            print(f"{p.name:13s} {p.what}\n{'':13s} {p.file}; tests: {', '.join(p.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="lcr-protections-") as folder:
        worktree = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), "HEAD"], cwd=REPO, check=True)
        try:
            results = [check(p, worktree) for p in chosen]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
