"""The dataset report: every kind of broken pair is named, nothing is dropped silently."""

import json

import numpy as np

import pytest
from PIL import Image

from longcat_ray.cli import main
from longcat_ray.config import load_config
from longcat_ray.pairs import DatasetError, prepare_pairs

pytestmark = pytest.mark.slow


def png(path, size=(160, 160), colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_backend(tmp_path, edits, refs: dict, minimum=None):
    """One edit dataset `e` (textfile captions) linked to the reference datasets {id: folder}; -> config path."""
    edit = {"id": "e", "instance_data_dir": str(edits), "caption_strategy": "textfile", "resolution": 128,
            "cache_dir_vae": str(tmp_path / "c" / "e"), "conditioning_data": list(refs), "minimum_image_size": minimum}
    backend = [edit] + [{"id": r, "instance_data_dir": str(folder), "caption_strategy": None, "resolution": 128,
                         "cache_dir_vae": str(tmp_path / "c" / r)} for r, folder in refs.items()]
    (tmp_path / "backend.json").write_text(json.dumps(backend))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "backend.json")}))
    return tmp_path / "config.json"


@pytest.fixture()
def broken(tmp_path):
    """Two good pairs and one pair broken in each way the report must name."""
    edits, refs = tmp_path / "edits", tmp_path / "refs"
    for stem in ("good_a", "good_b", "no_caption", "bad_caption", "corrupt", "empty", "truncated", "small", "sub/nested"):
        png(edits / f"{stem}.png")
        png(refs / f"{stem}.png", colour="blue")
        (edits / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
        (edits / f"{stem}.txt").write_text("make it blue")
    png(edits / "orphan_edit.png")
    (edits / "orphan_edit.txt").write_text("x")
    png(refs / "orphan_ref.png")
    (edits / "no_caption.txt").unlink()
    (edits / "bad_caption.txt").write_bytes(b"caf\xe9 \xff")
    (refs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    (edits / "empty.png").write_bytes(b"")
    data = (refs / "truncated.png").read_bytes()
    (refs / "truncated.png").write_bytes(data[: len(data) // 2])
    png(edits / "small.png", size=(32, 32))
    write_backend(tmp_path, edits, {"r": refs}, minimum=64)
    return tmp_path


EXPECTED = {
    "edit without reference": "edits/orphan_edit.png",
    "reference without edit": "refs/orphan_ref.png",
    "missing caption": "edits/no_caption.txt",
    "undecodable caption": "edits/bad_caption.txt",
    "unreadable image": ["refs/corrupt.png", "edits/empty.png", "refs/truncated.png"],
    "image below minimum size": "edits/small.png",
}


def test_report_names_every_broken_file(ray_local, broken):
    config, _ = load_config(broken / "config.json")
    with pytest.raises(DatasetError) as err:
        prepare_pairs(config)
    found = {(p.kind, p.file.removeprefix(str(broken) + "/")) for p in err.value.problems}
    expected = {(kind, f) for kind, files in EXPECTED.items() for f in ([files] if isinstance(files, str) else files)}
    assert found == expected
    assert "0 bytes" in str(err.value)


def test_skip_bad_pairs_keeps_the_good_ones_and_says_which(ray_local, broken, capsys):
    raw = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**raw, "skip_bad_pairs": True}))
    config, _ = load_config(broken / "config.json")
    good, problems, _ = prepare_pairs(config)
    assert sorted(r["sample_id"] for r in good) == ["e/good_a", "e/good_b", "e/sub/nested"]
    assert len(problems) == 8
    assert all(r["caption"] == "make it blue" and (r["bucket_w"], r["bucket_h"]) == (128, 128) for r in good)


def test_cli_stops_with_the_report(ray_local, broken, capsys):
    assert main(["cache", "--config", str(broken / "config.json")]) == 2
    err = capsys.readouterr().err
    assert "dataset report: 8 problem(s)" in err and "orphan_ref.png" in err and "skip_bad_pairs" in err


def test_minimum_image_size_is_read_in_the_datasets_unit():
    from longcat_ray.pairs import meets_minimum

    assert meets_minimum(1024, 512, 700, "pixel_area") and not meets_minimum(1024, 256, 700, "pixel_area")  # area
    assert not meets_minimum(1024, 512, 700, "pixel") and meets_minimum(1024, 768, 700, "pixel")  # both edges
    assert meets_minimum(1024, 1024, 1.0, "area") and not meets_minimum(1024, 900, 1.0, "area")  # megapixels
    assert meets_minimum(8, 8, 0, "pixel") and meets_minimum(8, 8, None, "area")


def test_small_edits_are_left_out_and_listed_without_stopping_the_run(ray_local, tmp_path):
    edits, refs = tmp_path / "edits", tmp_path / "refs"
    for stem, edit_size in (("big", (160, 160)), ("wide", (320, 40)), ("tiny", (32, 32))):
        png(edits / f"{stem}.png", size=edit_size)
        png(refs / f"{stem}.png", size=(32, 32), colour="blue")  # references are exempt
        (edits / f"{stem}.txt").write_text("make it blue")
    config, _ = load_config(write_backend(tmp_path, edits, {"r": refs}, minimum=100))
    good, problems, _ = prepare_pairs(config)  # no DatasetError, no skip_bad_pairs needed
    assert sorted(r["sample_id"] for r in good) == ["e/big", "e/wide"]  # 320x40 has 100x100 of area
    assert [(p.kind, p.file) for p in problems] == [("image below minimum size", str(edits / "tiny.png"))]
    assert "under 100x100 px of area" in problems[0].detail


def test_two_reference_sets_give_each_edit_one_pair_per_set(ray_local, tmp_path):
    for folder, colour in (("edits", "red"), ("r1", "blue"), ("r2", "green")):
        for stem in ("a", "b"):
            png(tmp_path / folder / f"{stem}.png", colour=colour)
    for stem in ("a", "b"):
        (tmp_path / "edits" / f"{stem}.txt").write_text("recolour it")
    config, _ = load_config(write_backend(tmp_path, tmp_path / "edits", {r: tmp_path / r for r in ("r1", "r2")}))
    good, problems, _ = prepare_pairs(config)
    assert not problems
    assert sorted((r["sample_id"], r["group"], r["ref_dataset_id"]) for r in good) == [
        ("e/a@r1", "e/a", "r1"), ("e/a@r2", "e/a", "r2"), ("e/b@r1", "e/b", "r1"), ("e/b@r2", "e/b", "r2")]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture()
def battery(tmp_path):
    """Issue 18's input battery: each awkward file beside a good pair -> (folder, {file: expected fate})."""
    import io
    import os
    import struct

    edits, refs = tmp_path / "edits", tmp_path / "refs"
    fates = {}

    def pair(stem, edit_fate="used", ref_fate="used", caption=b"make it blue", caption_fate="used", ref_size=(160, 160)):
        png(refs / f"{stem}.png", size=ref_size, colour="blue")
        (edits / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
        (edits / f"{stem}.txt").write_bytes(caption)
        fates.update({f"refs/{stem}.png": ref_fate, f"edits/{stem}.txt": caption_fate})
        for edit in (edits / stem).parent.glob(f"{(edits / stem).name}.*"):
            if edit.suffix != ".txt":
                fates[f"edits/{edit.relative_to(edits)}"] = edit_fate

    png(edits / "good.png")
    pair("good")
    png(edits / "a" / "b" / "nested.png")
    pair("a/b/nested")
    Image.new("CMYK", (160, 160), (0, 255, 255, 0)).save(edits / "cmyk.jpg")
    pair("cmyk")
    Image.fromarray(np.tile(np.linspace(0, 65535, 160).astype(np.uint16), (160, 1))).save(edits / "deep.png")  # 16-bit grey
    pair("deep")
    Image.new("LA", (160, 160), (90, 0)).save(edits / "grey_alpha.png")
    pair("grey_alpha")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 320x160, shown turned a quarter: 160x320
    Image.new("RGB", (320, 160), "red").save(edits / "turned.jpg", exif=exif.tobytes())
    pair("turned")
    buffer = io.BytesIO()
    Image.new("RGB", (160, 160), "red").save(buffer, format="JPEG")
    (edits / "jpeg_inside.png").write_bytes(buffer.getvalue())  # the extension lies; the content decides
    pair("jpeg_inside")
    (edits / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    pair("truncated", "error: unreadable image", "skipped: its pair is left out (another of its files has a problem)",
         caption_fate="skipped: a caption of a pair left out, or of no image")
    good = (edits / "good.png").read_bytes()
    (edits / "lying.png").write_bytes(good[:16] + struct.pack(">I", 9999) + good[20:])  # IHDR width changed, CRC not
    for stem, side in (("bomb", 20000), ("bomb_12k", 12000)):  # over twice PIL's pixel limit (its own error); 1-2x (ours)
        header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        (edits / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IEND", b""))
    (edits / "zero.png").write_bytes(b"")
    for stem in ("lying", "bomb", "bomb_12k", "zero"):
        pair(stem, "error: unreadable image", "skipped: its pair is left out (another of its files has a problem)",
             caption_fate="skipped: a caption of a pair left out, or of no image")
    left_out = ("skipped: its pair is left out (another of its files has a problem)", "skipped: a caption of a pair left out, or of no image")
    png(edits / "latin.png")
    pair("latin", left_out[0], left_out[0], caption=b"caf\xe9", caption_fate="error: undecodable caption")
    png(edits / "blank.png")
    pair("blank", left_out[0], left_out[0], caption=b"  \n", caption_fate="error: empty caption")
    png(edits / "far.png", size=(512, 512))
    pair("far", left_out[0], "error: reference much smaller than its edit", caption_fate=left_out[1], ref_size=(32, 32))
    png(edits / "Case.png")
    (edits / "Case.txt").write_text("x")
    png(refs / "case.png")
    fates.update({"edits/Case.png": "error: edit without reference", "edits/Case.txt": left_out[1],
                  "refs/case.png": "error: reference without edit"})
    png(edits / "twin.png")
    png(edits / "twin.jpg")
    pair("twin", "error: several images for one name", left_out[0], caption_fate=left_out[1])
    (edits / "README.md").write_text("notes")
    os.symlink(edits, edits / "loop")  # a link back to its own folder: listed, never followed
    fates.update({"edits/README.md": "skipped: not an image or caption", "edits/loop": "skipped: not an image or caption"})
    raw = json.loads(write_backend(tmp_path, edits, {"r": refs}).read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "skip_bad_pairs": True}))
    return tmp_path, fates


def test_the_input_battery_gets_its_documented_outcomes_and_every_file_is_counted_once(ray_local, battery):
    """Truncated, lying, empty, bomb, CMYK, 16-bit, grey+alpha, EXIF-turned, non-UTF-8 and empty captions, names that
    differ in case or extension only, nested folders, a symlink loop, a far smaller reference: the good ones train
    (decoded upright, 8-bit RGB), the rest are named, and the file report gives every file exactly one fate."""
    from longcat_ray.pairs import decode_image

    folder, fates = battery
    config, _ = load_config(folder / "config.json")
    good, problems, report = prepare_pairs(config)
    report = {url.removeprefix(str(folder) + "/"): fate for url, fate in report.items()}
    assert report == fates
    assert sorted(r["sample_id"] for r in good) == sorted(f"e/{s}" for s in ("good", "a/b/nested", "cmyk", "deep", "grey_alpha",
                                                                              "turned", "jpeg_inside"))
    turned = next(r for r in good if r["sample_id"] == "e/turned")
    assert (turned["width"], turned["height"]) == (160, 320) and turned["bucket_w"] < turned["bucket_h"]  # as a viewer shows it
    deep, _, _ = decode_image(str(folder / "edits" / "deep.png"), {})
    assert deep.mode == "RGB" and np.asarray(deep)[0, 0, 0] == 0 and np.asarray(deep)[0, -1, 0] == 255 and 100 < np.asarray(deep)[0, 80, 0] < 160
    for bomb in ("bomb.png", "bomb_12k.png"):  # refused from the header, before any pixel is decoded
        assert "DecompressionBomb" in next(p.detail for p in problems if p.file.endswith(bomb))
    assert "differs only in case" in next(p.detail for p in problems if p.file.endswith("Case.png"))
