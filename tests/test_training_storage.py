"""Training when output_dir's storage fails, on the tiny model: real Ray Train and DeepSpeed, moto's S3 server behind
a proxy the test cuts, a small tmpfs the test fills. (They need none of tests/test_training.py's reference run.)"""

import errno
import os
import subprocess
import time

import pytest

from longcat_ray.export import LORA_FILE, PEFT_DIR
from longcat_ray.run_record import SNAPSHOT
from longcat_ray.training import train
from tests.conftest import tiny_config
from tests.run_logs import recorded, recorded_under, samples_log

pytestmark = pytest.mark.slow


def storage_failure_message(config, fault) -> str:
    """Train `config` with `fault` running on a thread beside it; the run must stop with StorageFailed -> its message."""
    import threading

    from longcat_ray.training import StorageFailed

    faulting = threading.Thread(target=fault, daemon=True)
    faulting.start()
    with pytest.raises(StorageFailed) as failed:
        train(config, progress=False)
    faulting.join()
    return str(failed.value)


def test_output_dir_on_s3_survives_the_storage_going_away(tiny, ray_local, s3_endpoint, monkeypatch):
    """output_dir on s3:// (moto's server behind a loopback proxy the test cuts and restores). The storage cut as the
    first checkpoint is being uploaded: the run fails (no retries left) with one message naming the URL and
    the S3 error, and every checkpoint Ray recorded is complete (none cut short); with the storage back, the same
    call trains to the end and exports the LoRA to the bucket. (Before this test an s3:// output_dir failed at
    once: Ray wants the path without the scheme when given a filesystem.)"""
    import s3fs

    from ray.train import Checkpoint

    from longcat_ray.training import StorageFailed, copy_export, storage_filesystem
    from tests.s3_proxy import CuttableProxy

    direct = s3fs.S3FileSystem(endpoint_url=s3_endpoint)  # the test's own view, never cut
    bucket = f"lcr-out-{os.getpid()}"
    direct.mkdir(bucket)
    proxy = CuttableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")  # what the run uses
    config = tiny_config(tiny, f"s3://{bucket}/out", max_train_steps=8, checkpointing_steps=4, max_failures=0)
    config.validation.steps = 0

    def cut_at_first_checkpoint_object() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            direct.invalidate_cache()
            if any("/checkpoint_" in key for key in direct.find(f"{bucket}/out")):
                proxy.cut()
                return
            time.sleep(0.05)

    message = storage_failure_message(config, cut_at_first_checkpoint_object)
    assert f"s3://{bucket}/out" in message and "AWS Error" in message and "run the same command" in message
    direct.invalidate_cache()
    snapshot = f"{bucket}/out/run/{SNAPSHOT}"
    for name in recorded(direct.cat(snapshot)) if direct.exists(snapshot) else []:  # whatever Ray recorded was uploaded whole
        path = f"{bucket}/out/run/{name}"
        assert direct.exists(f"{path}/lora/{LORA_FILE}") and direct.ls(f"{path}/zero"), name

    proxy.restore()
    result = train(config, progress=False)
    assert result.steps == 8
    direct.invalidate_cache()
    assert direct.size(f"{bucket}/out/{LORA_FILE}") > 0 and direct.exists(f"{bucket}/out/{PEFT_DIR}")
    proxy.cut()  # gone again while the final LoRA is copied out of the last checkpoint: the same message
    with pytest.raises(StorageFailed, match=f"s3://{bucket}/out"):
        copy_export(Checkpoint(result.checkpoint, filesystem=storage_filesystem(config.train.output_dir)), config.train.output_dir)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs of its own (mounting needs root, as CI and the development machine have; skipped elsewhere,
    saying why)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): the full-disk test needs root")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk) -> str:
    """Write zeros into disk/filler until the disk is full -> the filler's path."""
    filler = os.path.join(disk, "filler")
    handle = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(handle, bytes(1 << 20)):
            pass
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(handle)
    return filler


def test_a_full_output_disk_stops_the_run_with_one_message_and_resumes_once_freed(tiny, ray_local, small_disk, capfd):
    """output_dir on a small disk that the test fills once the first checkpoint (of 4 steps) is recorded: the run stops
    (no retries left) with one message naming the disk and what to do, and every checkpoint Ray recorded is whole.
    Ray rewrites its record of the run's checkpoints in place, so a full disk can leave that record empty, and Ray
    then refuses to start the run again ("CheckpointManagerInitializationError": without run_record.recover, checked);
    the record is set aside and the newest checkpoint whose files are all there is resumed from. Once the space is
    freed the same call resumes from a checkpoint (not step 0), trains to the end and exports the LoRA."""
    from longcat_ray.run_record import whole_step
    from longcat_ray.storage import filesystem

    out = small_disk / "out"
    config = tiny_config(tiny, out, max_train_steps=16, checkpointing_steps=4, max_failures=0)
    config.validation.steps = 0
    fillers = []

    def fill_once_a_checkpoint_is_recorded() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not recorded_under(out / "run"):
            time.sleep(0.02)
        fillers.append(fill(small_disk))

    message = storage_failure_message(config, fill_once_a_checkpoint_is_recorded)
    assert "No space left on device" in message and str(out) in message, message
    assert "free space" in message and "run the same command" in message
    fs, _ = filesystem(str(out))
    for checkpoint in recorded_under(out / "run"):  # whatever Ray recorded was stored whole
        assert whole_step(fs, checkpoint) in (4, 8, 12), checkpoint

    os.remove(fillers[0])
    # the state a disk that fills while Ray rewrites its record leaves (seen when this test filled the disk as the
    # first checkpoint was being stored): made here every time, since when the disk fills varies from run to run
    (out / "run" / SNAPSHOT).write_bytes(b"")
    capfd.readouterr()
    result = train(config, progress=False)
    assert result.steps == 16
    assert (out / LORA_FILE).stat().st_size > 0
    steps = [line["micro_step"] for line in samples_log(out, 0)]
    resumed_at = next(later for earlier, later in zip(steps, steps[1:]) if later <= earlier)
    assert resumed_at in (4, 8, 12) and steps[-1] == 15, steps  # from a whole checkpoint, not from step 0
    assert f"Resuming from {out}/run/checkpoint_" in capfd.readouterr().err
    assert len(list((out / "run").glob(f"{SNAPSHOT}.unreadable-*"))) == 1  # kept, not deleted
