"""References generated from the edit images (SimpleTuner's `conditioning` generators): the same operations and
defaults as SimpleTuner, one fixed image per edit, and pairs that the scan and the cache read like files."""

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFilter

from longcat_ray.config import ConfigError, load_config
from longcat_ray.generated import generate, settings
from longcat_ray.pairs import prepare_pairs, read_bytes


def photo(seed=0, size=(96, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).filter(ImageFilter.SMOOTH).save(out, format="PNG")
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generators_apply_simpletuners_operations_with_its_defaults():
    data = photo()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    blurred = generate({"type": "superresolution", "add_noise": False}, data)  # default blur: gaussian, radius 2
    np.testing.assert_array_equal(pixels(blurred), np.asarray(image.filter(ImageFilter.GaussianBlur(radius=2.0))))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=25)  # default: fixed quality 25, one round
    np.testing.assert_array_equal(pixels(generate({"type": "jpeg_artifacts"}, data)), pixels(out.getvalue()))
    edges = cv2.Canny(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY), 50, 100)  # default thresholds 50/100
    np.testing.assert_array_equal(pixels(generate({"type": "canny"}, data))[..., 0], edges)


def test_random_settings_give_one_fixed_reference_per_image():
    """SimpleTuner draws noise and qualities from a global random state; here they follow the image and settings, so
    every read (scan, cache, a resumed run) sees the same reference."""
    spec = {"type": "superresolution", "noise_level": 0.05, "downscale_factor": 2}
    first, again, other = generate(spec, photo(0)), generate(spec, photo(0)), generate(spec, photo(1))
    assert first == again and pixels(first).shape == pixels(other).shape == (64, 96, 3)
    assert generate({**spec, "noise_level": 0.06}, photo(0)) != first
    ranged = {"type": "jpeg_artifacts", "quality_mode": "range", "quality_range": [10, 30], "compression_rounds": 2}
    assert generate(ranged, photo(0)) == generate(ranged, photo(0))


def write(tmp_path, conditioning, edits=3) -> "Path":  # noqa: F821
    folder = tmp_path / "edits"
    folder.mkdir()
    for i in range(edits):
        (folder / f"e{i}.png").write_bytes(photo(i))
    edit = {"id": "photos", "instance_data_dir": str(folder), "caption_strategy": "instanceprompt",
            "instance_prompt": "restore the photo", "resolution": 64, "conditioning": conditioning}
    (tmp_path / "backend.json").write_text(json.dumps([edit]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "backend.json"),
                                                      "output_dir": str(tmp_path / "out")}))
    return tmp_path / "config.json"


@pytest.mark.slow
def test_each_generator_is_a_reference_dataset_paired_with_every_edit(ray_local, tmp_path):
    specs = [{"type": "superresolution", "blur_radius": 1.5}, {"type": "jpeg_artifacts", "params": {"quality": 15}}]
    config, warnings = load_config(write(tmp_path, specs))
    assert not warnings
    edit = config.data.dataset("photos")
    assert edit.conditioning_data == ["photos_conditioning_superresolution", "photos_conditioning_jpeg_artifacts"]
    good, problems, _ = prepare_pairs(config)
    assert not problems and len(good) == 6  # 3 edits x 2 generated references; each epoch trains one per edit
    for row in good:
        ref = config.data.dataset(row["ref_dataset_id"])
        edit_bytes = (tmp_path / "edits" / f"{row['group'].split('/')[1]}.png").read_bytes()
        assert read_bytes(row["ref_url"], ref.storage_options) == generate(settings(ref.generator), edit_bytes)
        assert row["caption"] == "restore the photo"


@pytest.mark.parametrize("spec, named", [
    ({"type": "depth_midas"}, "type 'depth_midas' does not make an edit reference"),
    ({"type": "canny", "captions": "edges of a photo"}, "'captions' 'edges of a photo'"),
])
def test_generators_longcat_cannot_use_are_refused_by_name(tmp_path, spec, named):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, [spec]))
    assert named in str(err.value) and "Fix:" in str(err.value)


def test_a_generator_listed_twice_is_named_not_dropped(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, [{"type": "canny"}, {"type": "canny", "low_threshold": 10}]))
    assert "'photos_conditioning_canny', an id another dataset already has" in str(err.value)
