"""The dataset report: every kind of broken pair is named, nothing is dropped silently."""

import json

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
    good, problems = prepare_pairs(config)
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
    good, problems = prepare_pairs(config)  # no DatasetError, no skip_bad_pairs needed
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
    good, problems = prepare_pairs(config)
    assert not problems
    assert sorted((r["sample_id"], r["group"], r["ref_dataset_id"]) for r in good) == [
        ("e/a@r1", "e/a", "r1"), ("e/a@r2", "e/a", "r2"), ("e/b@r1", "e/b", "r1"), ("e/b@r2", "e/b", "r2")]
