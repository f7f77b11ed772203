"""`type: huggingface` datasets in SimpleTuner's shapes, on a dataset this test builds and saves locally (the hub
path is the same `datasets` code with a hub id): rows as images, nested caption columns, composite panels, filters."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from longcat_ray.config import ConfigError, load_config
from longcat_ray.pairs import DatasetError, prepare_pairs, read_bytes

pytestmark = pytest.mark.slow
ROWS = 5
KEEP = [0, 2, 3]  # collection_1 with every quality score >= 4.5


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """Subjects200K's layout: each image two side-by-side 64x64 panels, one caption per panel, quality and collection."""
    import datasets

    rng = np.random.default_rng(0)
    composites = [rng.integers(0, 256, (64, 128, 3), dtype=np.uint8) for _ in range(ROWS)]
    table = datasets.Dataset.from_dict({
        "image": [Image.fromarray(c) for c in composites],
        "collection": ["collection_1", "collection_1", "collection_1", "collection_1", "collection_2"],
        "quality_assessment": [{"imageQuality": q, "objectConsistency": 5} for q in (5, 4, 5, 4.5, 5)],
        "description": [{"description_0": f"left {i}", "description_1": f"put it on a beach {i}"} for i in range(ROWS)],
    }, features=datasets.Features({
        "image": datasets.Image(), "collection": datasets.Value("string"),
        "quality_assessment": {"imageQuality": datasets.Value("float32"), "objectConsistency": datasets.Value("float32")},
        "description": {"description_0": datasets.Value("string"), "description_1": datasets.Value("string")},
    }))
    folder = tmp_path_factory.mktemp("hub") / "subjects"
    table.save_to_disk(str(folder))
    return folder, composites


def entry(name, panel: int, caption_column: str, **extra) -> dict:
    """One SimpleTuner Subjects200K-preset entry (documentation/data_presets/preset_subjects200k.md's shape)."""
    return {
        "type": "huggingface", "dataset_name": name, "caption_strategy": "huggingface", "metadata_backend": "huggingface",
        "resolution": 64, "resolution_type": "pixel_area",
        "huggingface": {
            "caption_column": caption_column, "image_column": "image",
            "composite_image_config": {"enabled": True, "image_count": 2, "select_index": panel},
            "filter_func": {"collection": "collection_1", "quality_thresholds": {"imageQuality": 4.5, "objectConsistency": 4.5}},
        },
        **extra,
    }


def write_config(tmp_path, name, **edit_extra):
    """The edit is the right panel with its caption as the instruction; the reference, the left panel, names its edit
    dataset from its side (source_dataset_id), as SimpleTuner's Kontext quickstart writes it."""
    edit = {"id": "beach", **entry(str(name), 1, "description.description_1"), "cache_dir_vae": str(tmp_path / "vae" / "e"),
            **edit_extra}
    ref = {"id": "studio", "dataset_type": "conditioning", "conditioning_type": "reference_strict", "source_dataset_id": "beach",
           **entry(str(name), 0, "description.description_0"), "caption_strategy": None, "cache_dir_vae": str(tmp_path / "vae" / "r")}
    (tmp_path / "backend.json").write_text(json.dumps([edit, ref]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "backend.json")}))
    return tmp_path / "config.json"


def test_rows_pair_by_row_with_the_instruction_from_the_nested_caption(ray_local, subjects, tmp_path):
    folder, composites = subjects
    config, warnings = load_config(write_config(tmp_path, folder))
    assert not warnings
    good, problems, _ = prepare_pairs(config)
    assert not problems
    assert sorted(int(r["sample_id"].split("/")[1]) for r in good) == KEEP  # the filter, SimpleTuner's rules
    for row in good:
        index = int(row["sample_id"].split("/")[1])
        assert row["caption"] == f"put it on a beach {index}"
        assert (row["width"], row["height"]) == (64, 64)
        for url, options, half in ((row["edit_url"], config.data.dataset("beach").storage_options, slice(64, 128)),
                                   (row["ref_url"], config.data.dataset("studio").storage_options, slice(0, 64))):
            panel = np.asarray(Image.open(io.BytesIO(read_bytes(url, options))))
            np.testing.assert_array_equal(panel, composites[index][:, half])  # the panel, losslessly


def test_a_missing_dataset_or_column_is_named(ray_local, subjects, tmp_path):
    folder, _ = subjects
    config, _ = load_config(write_config(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(DatasetError) as err:
        prepare_pairs(config)
    assert "unreadable Hugging Face dataset" in str(err.value) and "nowhere" in str(err.value)
    config, _ = load_config(write_config(tmp_path, folder, huggingface={"caption_column": "instruction"}))
    with pytest.raises(DatasetError) as err:
        prepare_pairs(config)
    assert "no caption column ['instruction']" in str(err.value)


@pytest.mark.parametrize("edit_extra, named", [
    ({"dataset_name": None}, "key 'dataset_name' is missing"),
    ({"caption_strategy": "textfile"}, "caption_strategy 'textfile' has no files"),
    ({"huggingface": {"caption_column": ["short", "long"]}}, "cannot draw among several caption columns"),
    ({"huggingface": {"caption_column": "c", "filter_func": {"aesthetic": 5}}}, "['aesthetic'] are not SimpleTuner's filters"),
    ({"huggingface": {"caption_column": "c", "composite_image_config": {"enabled": True, "image_count": 2, "select_index": 2}}},
     "select_index 2 is not one of the 2 panels"),
])
def test_hub_keys_that_cannot_work_are_refused_by_name(subjects, tmp_path, edit_extra, named):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, subjects[0], **edit_extra))
    assert named in str(err.value) and "Fix:" in str(err.value)
