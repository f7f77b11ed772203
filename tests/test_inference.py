"""The one inference path equals LongCatImageEditPipeline at the size the pipeline picks."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions

from longcat_ray.inference import EditRequest, edit_image, edit_images
from tests.conftest import reference_image, with_mrope


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_edit_matches_pipeline(tiny, tiny_pipe, guidance):
    reference = reference_image(tiny, 2).resize((48, 72))  # a small portrait input keeps the 1-MP run short
    width, height = calculate_dimensions(1024 * 1024, reference.width / reference.height)
    prompt = "swap the red and blue colours"
    with with_mrope(tiny_pipe):
        theirs = tiny_pipe(
            reference, prompt, num_inference_steps=3, guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(7), output_type="np",
        ).images[0]
    request = EditRequest(prompt=prompt, width=width, height=height, steps=3, guidance=guidance, seed=7)
    ours = np.asarray(edit_image(tiny_pipe, reference, request), dtype=np.float32) / 255
    assert ours.shape == theirs.shape == (height, width, 3)
    assert np.abs(ours - theirs).max() <= 1.5 / 255  # ours is rounded to 8 bits, theirs is float
    other = np.asarray(edit_image(tiny_pipe, reference, EditRequest(**{**request.__dict__, "seed": 8})), np.float32) / 255
    assert np.abs(other - theirs).max() > 10 / 255


def test_explicit_size_and_preview(tiny, tiny_pipe):
    seen = []
    request = EditRequest(prompt="x", width=128, height=96, steps=2, guidance=4.5, seed=0)
    image = edit_image(tiny_pipe, reference_image(tiny), request, preview=lambda i, lat: seen.append((i, lat.shape)))
    assert image.size == (128, 96)
    assert seen == [(0, (1, 48, 64)), (1, (1, 48, 64))]


@pytest.mark.parametrize("field,value,message", [("width", 100, "nearest valid: 96"), ("height", 8, "nearest valid: 16")])
def test_size_off_grid_names_nearest(field, value, message):
    kwargs = {"prompt": "x", "width": 128, "height": 128, field: value}
    with pytest.raises(ValueError, match=message):
        EditRequest(**kwargs)


def test_batched_edits_equal_single_edits(tiny, tiny_pipe):
    """Serve batches requests that share a size: each row must come out as it would alone."""
    references = [reference_image(tiny, 1), reference_image(tiny, 3)]
    requests = [EditRequest(prompt="swap the colours", width=64, height=96, steps=2, guidance=4.5, seed=1),
                EditRequest(prompt="make it blue", width=64, height=96, steps=2, guidance=2.0, seed=2, negative_prompt="red")]
    batched = edit_images(tiny_pipe, references, requests)
    for reference, request, image in zip(references, requests, batched):
        single = np.asarray(edit_image(tiny_pipe, reference, request), np.float32)
        assert np.abs(np.asarray(image, np.float32) - single).max() <= 1.0
    assert np.abs(np.asarray(batched[0], np.float32) - np.asarray(batched[1], np.float32)).max() > 10
    with pytest.raises(ValueError, match="one batch needs one size"):
        edit_images(tiny_pipe, references, [requests[0], EditRequest(prompt="x", width=64, height=64, steps=2)])


def test_fp8_dit_predicts_like_the_full_one_and_takes_loras(tiny, tiny_pipe, tiny_loras):
    """Serving's `quantize: fp8` on the tiny model (CPU fp8 matmuls): the converted DiT's velocity stays close to
    the unconverted one's, with and without a LoRA loaded onto the converted layers afterwards (and the LoRA's
    effect is much larger than fp8's error); batched edits still equal single ones (scales per row)."""
    from diffusers import LongCatImageEditPipeline

    from longcat_ray.inference import load_lora, quantize_dit
    from longcat_ray.model.flow import edit_position_ids, predict_velocity
    from longcat_ray.model.fp8 import Float8RowwiseLinear

    g = torch.Generator().manual_seed(0)
    noisy, ref, text = torch.randn(2, 24, 64, generator=g), torch.randn(2, 24, 64, generator=g), torch.randn(2, 12, 64, generator=g)
    txt_ids, img_ids = edit_position_ids(12, 4, 6)
    velocity = {}
    for quantize in ("none", "fp8"):
        pipe = LongCatImageEditPipeline.from_pretrained(tiny.model)
        pipe.set_progress_bar_config(disable=True)
        quantize_dit(pipe.transformer, quantize)
        with torch.no_grad():
            velocity[quantize] = predict_velocity(pipe.transformer, noisy, ref, text, txt_ids, img_ids, torch.tensor([0.7, 0.3]))
            load_lora(pipe.transformer, str(tiny_loras / "style0"), "style0")
            pipe.transformer.set_adapters(["style0"], [10.0])  # loud enough to stand out of fp8's error
            velocity[quantize + "+lora"] = predict_velocity(pipe.transformer, noisy, ref, text, txt_ids, img_ids, torch.tensor([0.7, 0.3]))
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.base_layer, Float8RowwiseLinear)
    fast = LongCatImageEditPipeline.from_pretrained(tiny.model).transformer
    quantize_dit(fast, "fp8-fast")
    assert {m.FAST_ACCUM for m in fast.modules() if isinstance(m, Float8RowwiseLinear)} == {True}
    assert not Float8RowwiseLinear.FAST_ACCUM  # per converted layer, not for every fp8 DiT in the process
    with torch.no_grad():
        velocity["fp8-fast"] = predict_velocity(fast, noisy, ref, text, txt_ids, img_ids, torch.tensor([0.7, 0.3]))
    relative = lambda a, b: ((velocity[a] - velocity[b]).norm() / velocity[b].norm()).item()  # noqa: E731
    assert relative("fp8", "none") < 0.1 and relative("fp8+lora", "none+lora") < 0.1  # e4m3 at 32 wide: ~5% measured
    assert relative("fp8-fast", "none") < 0.1
    lora_on_fp8, lora_on_full = velocity["fp8+lora"] - velocity["fp8"], velocity["none+lora"] - velocity["none"]
    assert ((lora_on_fp8 - lora_on_full).norm() / lora_on_full.norm()).item() < 0.2  # the adapter acts as on bf16
    pipe.transformer.delete_adapters("style0")
    references = [reference_image(tiny, 1), reference_image(tiny, 3)]
    requests = [EditRequest(prompt="swap the colours", width=64, height=96, steps=2, guidance=4.5, seed=1),
                EditRequest(prompt="make it blue", width=64, height=96, steps=2, guidance=2.0, seed=2)]
    batched = edit_images(pipe, references, requests)
    for reference, request, image in zip(references, requests, batched):
        single = np.asarray(edit_image(pipe, reference, request), np.float32)
        assert np.abs(np.asarray(image, np.float32) - single).max() <= 1.0


def test_a_loaded_lora_holds_the_files_weights_where_the_base_is(tiny, tiny_loras, monkeypatch):
    """load_lora skips peft's random init (low_cpu_mem_usage: the adapter layers are made on the meta device, so
    no initialiser touches real memory), and every adapter weight equals the file's, in the base's dtype and on its
    device."""
    from longcat_ray.config import ModelConfig
    from longcat_ray.inference import load_lora
    from longcat_ray.model.transformer import load_transformer

    transformer = load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny.model)), torch.bfloat16, torch.device("cpu"))
    initialised, kaiming = [], torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: initialised.append(t.device.type) or kaiming(t, *a, **k))
    weights = load_lora(transformer, str(tiny_loras / "style0"), "style0")
    assert set(initialised) <= {"meta"}, initialised
    params = dict(transformer.named_parameters())
    assert len(weights.state) > 0
    for key, tensor in weights.state.items():
        loaded = params[key.replace(".weight", ".style0.weight")]
        assert loaded.dtype == torch.bfloat16 and loaded.device.type == "cpu"
        assert torch.equal(loaded, tensor.to(torch.bfloat16)), key


def test_lora_strengths_and_adapters_under_one_name_switch_without_recompiling(tiny, tiny_loras):
    """Editor.use_loras (held 0-dim scale tensors) computes what diffusers' set_adapters(names, weights) computes,
    bit for bit; with the DiT's blocks compiled as serving compiles them, a new strength or another adapter loaded
    under the same adapter name (as serving loads every adapter) compiles nothing new (each used to compile both
    block graphs again)."""
    from diffusers import LongCatImageEditPipeline
    from torch._dynamo.utils import counters

    from longcat_ray.inference import Editor
    from longcat_ray.model.flow import edit_position_ids, predict_velocity

    g = torch.Generator().manual_seed(0)
    noisy, ref, text = torch.randn(1, 24, 64, generator=g), torch.randn(1, 24, 64, generator=g), torch.randn(1, 12, 64, generator=g)
    txt_ids, img_ids = edit_position_ids(12, 4, 6)
    pipe = LongCatImageEditPipeline.from_pretrained(tiny.model)
    editor = Editor(pipe)
    velocity = lambda: predict_velocity(pipe.transformer, noisy, ref, text, txt_ids, img_ids, torch.tensor([0.7]))  # noqa: E731
    editor.add_lora(str(tiny_loras / "style0"), "active")
    with torch.no_grad():
        pipe.transformer.set_adapters(["active"], [0.7])  # diffusers' path: Python floats
        expected = velocity()
        editor.use_loras({"active": 0.7})
        assert torch.equal(velocity(), expected)

        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        compiled = velocity()  # compiles at strength 0.7
        assert torch.allclose(compiled, expected, atol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        editor.use_loras({"active": 0.3})
        weaker = velocity()
        pipe.transformer.delete_adapters("active")
        editor.loras.pop("active")
        editor.add_lora(str(tiny_loras / "style1.safetensors"), "active")
        editor.use_loras({"active": 1.2})
        other = velocity()
        assert counters["stats"]["unique_graphs"] == graphs
        pipe.transformer.set_adapters(["active"], [1.2])  # the reference for style1 at 1.2, through diffusers (eager)
        torch._dynamo.reset()
    assert not torch.allclose(weaker, compiled, atol=1e-3) and not torch.allclose(other, compiled, atol=1e-3)
    with torch.no_grad():
        assert torch.allclose(other, velocity(), atol=1e-5)
