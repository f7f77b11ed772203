"""The cache stage on a local Ray with the tiny model: build, reuse, exact invalidation, corruption, S3."""

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from longcat_ray.buckets import fit_to_bucket
from longcat_ray.cache import build_cache, load_entry, make_plan, manifest_url, read_manifest
from longcat_ray.config import load_config
from longcat_ray.model.latents import encode_latents, image_to_tensor
from longcat_ray.model.prompt import MAX_INSTRUCTION_TOKENS, encode_prompts, pipeline_prompt_encoder, vl_image
from longcat_ray.reader import batch_tensors, plan_epoch, shard_dataset
from longcat_ray.storage import filesystem

pytestmark = pytest.mark.slow


@pytest.fixture()
def data(tiny, tmp_path):
    """A private copy of the tiny dataset and config (tests modify images and entries)."""
    root = tmp_path / "t"
    shutil.copytree(tiny.root / "data", root / "data")
    config = json.loads(tiny.config.read_text())
    backend = json.loads(tiny.backend.read_text())
    for entry in backend:
        for key in ("instance_data_dir", "cache_dir_vae", "cache_dir"):
            if key in entry:
                entry[key] = entry[key].replace(str(tiny.root), str(root))
    (root / "config").mkdir()
    config["--data_backend_config"] = str(root / "config" / "multidatabackend.json")
    config["--output_dir"] = str(root / "output")
    return root, config, backend


def save(root, config, backend):
    (root / "config" / "multidatabackend.json").write_text(json.dumps(backend))
    (root / "config" / "config.json").write_text(json.dumps(config))
    return load_config(root / "config" / "config.json")[0]


def entry_url(config, sample, kind):
    return next(m for m in read_manifest(config) if m["sample_id"] == sample)["entries"][kind]


def damage(config, sample, kind, how):
    fs, path = filesystem(entry_url(config, sample, kind), config.data.text_cache_options)
    data = bytearray(fs.cat_file(path))
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "swap":  # another sample's valid entry under this one's name: right checksum, wrong sample
        data = fs.cat_file(filesystem(entry_url(config, "edit-images/pair_0001", kind), config.data.text_cache_options)[1])
    else:
        data[-40] ^= 0xFF  # a flipped bit in the tensor bytes: parses, fails the checksum
    fs.pipe_file(path, bytes(data))


def test_cache_build_reuse_and_exact_invalidation(ray_local, data, tiny_pipe):
    root, raw, backend = data
    config = save(root, raw, backend)
    first = build_cache(config, progress=False)
    assert (first.pairs, first.encoded, first.reused) == (8, 8, 0) and first.cache_bytes > 0
    assert build_cache(config, progress=False).encoded == 0

    # cached tensors equal the foundation's encoding functions
    sample = read_manifest(config)[1]
    w, h = sample["bucket_w"], sample["bucket_h"]
    stem = sample["sample_id"].split("/", 1)[1]
    ref = fit_to_bucket(Image.open(root / "data" / "refs" / f"{stem}.png"), w, h)
    edit = fit_to_bucket(Image.open(root / "data" / "edits" / f"{stem}.png"), w, h)
    row = next(iter(shard_dataset([[sample]], make_plan(config).options).iter_rows()))
    got = batch_tensors(row)
    torch.testing.assert_close(got["edit"][0], encode_latents(tiny_pipe.vae, image_to_tensor([edit]))[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["ref"][0], encode_latents(tiny_pipe.vae, image_to_tensor([ref]))[0], atol=1e-4, rtol=1e-4)
    vl = vl_image(ref, w, h)
    expected = encode_prompts(*pipeline_prompt_encoder(tiny_pipe), [sample["caption"]], [vl])[0]
    torch.testing.assert_close(got["text"][0], expected, atol=1e-4, rtol=1e-4)
    blank = encode_prompts(*pipeline_prompt_encoder(tiny_pipe), [""], [vl])[0]
    torch.testing.assert_close(got["blank"][0], blank, atol=1e-4, rtol=1e-4)
    # stored compactly: each distinct row once (the 512 instruction slots are mostly one pad state)
    stored = load_entry(entry_url(config, sample["sample_id"], "text"), {})
    assert stored["prompt_embeds"].shape[0] < expected.shape[0] - MAX_INSTRUCTION_TOKENS + 64
    assert load_entry(entry_url(config, sample["sample_id"], "blank"), {})["prompt_embeds"].shape[0] == expected.shape[0] - MAX_INSTRUCTION_TOKENS + 1

    # one changed image -> one pair; a changed caption -> only its text entry; damaged entries -> re-encoded
    image = Image.open(root / "data" / "edits" / "pair_0003.png")
    image.rotate(180).save(root / "data" / "edits" / "pair_0003.png")
    (root / "data" / "edits" / "pair_0005.txt").write_text("a different instruction\n")
    damage(config, "edit-images/pair_0006", "ref", "flip")
    damage(config, "edit-images/pair_0007", "text", "truncate")
    damage(config, "edit-images/pair_0004", "edit", "swap")
    edit_entry_5 = entry_url(config, "edit-images/pair_0005", "edit")
    mtime = os.stat(edit_entry_5).st_mtime
    again = build_cache(config, progress=False)
    assert (again.encoded, again.reused) == (5, 3)
    assert os.stat(entry_url(config, "edit-images/pair_0005", "edit")).st_mtime == mtime

    # a changed resolution re-encodes exactly the pairs whose bucket changed
    before = {m["sample_id"]: (m["bucket_w"], m["bucket_h"]) for m in read_manifest(config)}
    for entry in backend[:2]:
        entry["resolution"] = 256
    config = save(root, raw, backend)
    changed = build_cache(config, progress=False).encoded
    after = {m["sample_id"]: (m["bucket_w"], m["bucket_h"]) for m in read_manifest(config)}
    assert changed == sum(before[k] != after[k] for k in before) > 0

    # another text encoder (a fine-tuned copy): every text entry is re-encoded under its new fingerprint, no latent
    from safetensors.torch import load_file, save_file

    model = root / "model"
    shutil.copytree(raw["--pretrained_model_name_or_path"], model)
    weights = load_file(model / "text_encoder" / "model.safetensors")
    weights = {k: v * 1.05 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, model / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    old_rows = {m["sample_id"]: m["entries"] for m in read_manifest(config)}
    config = save(root, {**raw, "--pretrained_model_name_or_path": str(model)}, backend)
    assert build_cache(config, progress=False).encoded == 8
    for row in read_manifest(config):
        old = old_rows[row["sample_id"]]
        assert row["entries"]["text"] != old["text"] and row["entries"]["edit"] == old["edit"]
        assert not torch.equal(load_entry(row["entries"]["text"], {})["prompt_embeds"], load_entry(old["text"], {})["prompt_embeds"])


def test_cache_reader_shards(ray_local, data):
    root, raw, backend = data
    config = save(root, raw, backend)
    build_cache(config, progress=False)
    manifest = read_manifest(config)
    plan = plan_epoch(manifest, 2, 2, seed=0, epoch=0)
    seen = []
    for rank in range(2):
        for row in shard_dataset(plan[rank], make_plan(config).options).iter_rows():
            tensors = batch_tensors(row)
            ids = json.loads(row["sample_ids"])
            seen += ids
            assert tensors["edit"].shape[0] == tensors["text"].shape[0] == len(ids)
            assert tensors["edit"].shape == tensors["ref"].shape
    assert sorted(seen) == sorted(m["sample_id"] for m in manifest)


def test_cache_on_s3_and_the_storage_going_away_mid_write(ray_local, data, s3_endpoint):
    """Images and every cache dir on s3:// (SimpleTuner's aws dataset keys) against a loopback S3 API, behind a
    proxy that cuts the storage as the third entry is uploaded: the build stops with one message naming the
    entry's URL and what to do, no manifest is written (no training starts on a half-built cache), and the entries
    uploaded before the cut are whole (an S3 PUT lands whole or not at all). With the storage back the same build
    encodes only what is missing, keeps those entries, and then reuses and invalidates as on a local disk."""
    import s3fs

    from longcat_ray.cache import CacheStorageFailed
    from tests.s3_proxy import CuttableProxy

    root, raw, backend = data
    bucket = f"lcr-{os.getpid()}-{id(data) % 10000}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)  # the test's own view, never cut
    fs.mkdir(bucket)
    fs.put(str(root / "data") + "/", f"{bucket}/data/", recursive=True)
    proxy = CuttableProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    aws = {"type": "aws", "aws_bucket_name": bucket, "aws_endpoint_url": f"http://127.0.0.1:{proxy.port}",
           "aws_region_name": "us-east-1"}
    backend[0].update(aws, aws_data_prefix="data/edits", cache_dir_vae=f"s3://{bucket}/cache/vae/edit")
    backend[1].update(aws, aws_data_prefix="data/refs", cache_dir_vae=f"s3://{bucket}/cache/vae/ref")
    backend[2].update(aws, cache_dir=f"s3://{bucket}/cache/text")
    for entry in backend[:2]:
        entry.pop("instance_data_dir")
    config = save(root, raw, backend)
    proxy.cut_at_put(3)
    with pytest.raises(CacheStorageFailed) as failed:
        build_cache(config, progress=False)
    message = str(failed.value)
    assert f"s3://{bucket}/cache/" in message and "run the same command" in message, message
    assert not fs.exists(manifest_url(config).removeprefix("s3://"))
    written = {key: fs.info(key)["ETag"] for key in fs.find(f"{bucket}/cache") if key.endswith(".safetensors")}
    assert 0 < len(written) < 8, written  # some landed before the cut (PUTs are counted from the bytes: roughly)

    proxy.restore()
    first = build_cache(config, progress=False)
    assert first.encoded + first.reused == 8 and first.encoded >= 7 and first.manifest.startswith("s3://")
    fs.invalidate_cache()
    assert {key: fs.info(key)["ETag"] for key in written} == written  # checked whole and kept, not written again
    assert len(fs.ls(f"{bucket}/cache/vae/edit")) == 8 and len(fs.ls(f"{bucket}/cache/vae/ref")) == 8
    with fs.open(f"{bucket}/data/edits/pair_0002.png", "wb") as handle:
        Image.new("RGB", (160, 160), "green").save(handle, "PNG")
    damage(config, "edit-images/pair_0004", "text", "flip")
    fs.invalidate_cache()
    again = build_cache(config, progress=False)
    assert (again.encoded, again.reused) == (2, 6)
    plan = plan_epoch(read_manifest(config), 4, 1, seed=0, epoch=0)[0]
    rows = list(shard_dataset(plan, make_plan(config).options).iter_rows())
    assert sum(len(json.loads(r["sample_ids"])) for r in rows) == 8

