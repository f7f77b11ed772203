"""Request checks, without a server: sizes from the source's aspect, limits, bombs."""

import io

import pytest
from PIL import Image

from longcat_ray.serving.adapters import check_lora_id, find_lora, list_loras
from longcat_ray.serving.config import ServeConfig
from longcat_ray.serving.uploads import RequestError, build_request, decode_upload

CONFIG = ServeConfig(model="m", max_input_pixels=1_000_000, max_upload_bytes=100_000, max_side=512, max_steps=50)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_sizes_follow_the_source_aspect_on_the_16px_grid():
    landscape = Image.new("RGB", (300, 200))
    assert build_request(landscape, CONFIG, prompt="x").width > build_request(landscape, CONFIG, prompt="x").height
    request = build_request(landscape, CONFIG, prompt="x", width=240)
    assert (request.width, request.height) == (240, 160)
    request = build_request(landscape, CONFIG.model_copy(update={"default_area": 256 * 256}), prompt="x")
    assert request.width % 16 == request.height % 16 == 0 and abs(request.width * request.height - 256 * 256) < 0.2 * 256 * 256


@pytest.mark.parametrize("fields,status,field", [
    ({"num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"num_inference_steps": 51}, 422, "num_inference_steps"),
    ({"guidance_scale": float("nan")}, 422, "guidance_scale"),
    ({"guidance_scale": 21}, 422, "guidance_scale"),
    ({"width": 100}, 422, "width"),
    ({"height": 1024}, 422, "height"),
    ({"seed": -1}, 422, "seed"),
    ({"prompt": "  "}, 422, "prompt"),
    ({"negative_prompt": "x" * 5000}, 422, "negative_prompt"),
])
def test_bad_fields_name_the_field(fields, status, field):
    with pytest.raises(RequestError) as err:
        build_request(Image.new("RGB", (64, 64)), CONFIG, **{"prompt": "x", **fields})
    assert (err.value.status, err.value.field) == (status, field)


def test_uploads_are_checked_before_decoding():
    with pytest.raises(RequestError, match="not a readable image") as err:
        decode_upload(b"GIF89a but not really", CONFIG)
    assert err.value.status == 422
    bomb = png(Image.new("1", (2000, 2000)))  # 4 MP of one colour: a few hundred bytes on the wire
    assert len(bomb) < 10_000
    with pytest.raises(RequestError, match="2000x2000 = 4000000 pixels") as err:
        decode_upload(bomb, CONFIG)
    assert err.value.status == 413
    truncated = png(Image.effect_noise((64, 64), 50).convert("RGB"))[:-2000]
    with pytest.raises(RequestError, match="damaged or truncated"):
        decode_upload(truncated, CONFIG)
    with pytest.raises(RequestError) as err:
        decode_upload(b"\0" * 100_001, CONFIG)
    assert err.value.status == 413
    assert decode_upload(png(Image.new("L", (32, 16))), CONFIG).mode == "RGB"

def test_uploads_are_decoded_as_training_decoded_its_images():
    """Upright by EXIF and 8-bit RGB, by longcat_ray/images.py as in the dataset scan: an upload conditions the model
    as the training references did."""
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 64x32, shown turned: 32x64
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "red").save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_upload(buffer.getvalue(), CONFIG).size == (32, 64)
    buffer = io.BytesIO()
    Image.new("I;16", (32, 32), 32768).save(buffer, format="PNG")  # mid-grey in 16 bits
    assert decode_upload(buffer.getvalue(), CONFIG).getpixel((0, 0)) == (128, 128, 128)



@pytest.mark.parametrize("lora_id", ["../style0", "/etc/passwd", "s3://bucket/x", "http://evil/x.safetensors",
                                     "style0/../../x", "a/b", "", ".hidden", "x" * 200, "%2e%2e", "%2e%2e%2fstyle0",
                                     "..%2fx"])
def test_lora_ids_never_leave_the_root(lora_id):
    with pytest.raises(RequestError) as err:
        check_lora_id(lora_id)
    assert (err.value.status, err.value.field) == (400, "lora")


def test_adapters_under_the_root(tiny_loras):
    listed = {entry["id"]: entry for entry in list_loras(str(tiny_loras), {})}
    assert sorted(listed) == ["lokr", "misfit", "official", "style0", "style1"]  # pickles are never offered
    assert (listed["official"]["layout"], listed["style0"]["layout"]) == ("peft", "diffusers")
    assert "LyCORIS LoKr" in listed["lokr"]["error"] and "layout" not in listed["lokr"]  # marked, with the reason
    assert find_lora(str(tiny_loras), "official", {})[0].endswith("official/adapter_model.safetensors")
    assert find_lora(str(tiny_loras), "style0", {})[0].endswith("style0/pytorch_lora_weights.safetensors")
    assert find_lora(str(tiny_loras), "style1", {})[0].endswith("style1.safetensors")
    for missing in ("pickled", "nope"):
        with pytest.raises(RequestError) as err:
            find_lora(str(tiny_loras), missing, {})
        assert err.value.status == 404


def test_links_out_of_the_root_are_not_served(tiny_loras, tmp_path):
    """A file or folder under the root that is a symbolic link to somewhere outside it is refused (403) and listed
    as such; a link that stays inside the root is served."""
    import shutil

    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_loras / "style1.safetensors", outside / "secret.safetensors")
    shutil.copytree(tiny_loras / "style0", outside / "folder")
    root.mkdir()
    shutil.copy(tiny_loras / "style1.safetensors", root / "kept.safetensors")
    (root / "file-out.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "folder-out").symlink_to(outside / "folder")
    (root / "file-in.safetensors").symlink_to(root / "kept.safetensors")
    for lora_id in ("file-out", "folder-out"):
        with pytest.raises(RequestError) as err:
            find_lora(str(root), lora_id, {})
        assert (err.value.status, err.value.field) == (403, "lora") and "leads out of the adapter root" in str(err.value)
    assert find_lora(str(root), "file-in", {})[0].endswith("file-in.safetensors")
    listed = {entry["id"]: entry for entry in list_loras(str(root), {})}
    assert listed["file-out"]["error"] == "a link that leads out of the adapter root: not served"
    assert "folder-out" not in listed  # the listing does not follow links to folders
    assert "error" not in listed["file-in"] and "error" not in listed["kept"]


@pytest.mark.parametrize("sizes,expected", [
    (None, [(512, 512)]),  # the square of default_area, capped at max_side
    ([], []),
    (["768x512", "64X64"], "max_side"),
    (["100x64"], "16-px grid"),
    (["big"], "WIDTHxHEIGHT"),
    ("256x128,64", [(256, 128), (64, 64)]),  # validation_resolution's syntax: one string, a bare side is square
])
def test_warmup_sizes(sizes, expected):
    from pydantic import ValidationError

    if isinstance(expected, str):
        with pytest.raises(ValidationError, match=expected):
            ServeConfig(model="m", max_side=512, warmup_sizes=sizes)
        return
    config = ServeConfig(model="m", max_side=512, warmup_sizes=sizes)
    assert config.warmup_shapes() == expected
    # nothing compiles (no GPU, or compile off): only sizes asked for are warmed
    assert config.warmup_shapes(compiling=False) == ([] if sizes is None else expected)


def test_a_result_is_encoded_once_in_the_asked_format():
    """PNG is lossless (the exact pixels back); JPEG/WebP at the asked quality; a format not offered names the field
    with the route's status."""
    from longcat_ray.serving.uploads import OUTPUT_FORMATS, Encoding, encode_image, output_encoding

    image = Image.effect_noise((64, 48), 40).convert("RGB")
    assert list(Image.open(io.BytesIO(encode_image(image, Encoding()))).getdata()) == list(image.getdata())
    for name in ("jpeg", "webp"):
        data = encode_image(image, output_encoding(name, 80))
        assert Image.open(io.BytesIO(data)).format == OUTPUT_FORMATS[name][0]
    assert len(encode_image(image, Encoding("jpeg", 5))) < len(encode_image(image, Encoding("jpeg", 95)))
    assert output_encoding(None, None) == Encoding("png", 90) == output_encoding("", None)
    for bad, status, field in ((("gif", None), 400, "output_format"), (("jpeg", 101), 422, "output_compression")):
        with pytest.raises(RequestError) as raised:
            output_encoding(*bad, status=400)
        assert (raised.value.status, raised.value.field) == (status, field)
