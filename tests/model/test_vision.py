"""The vision tower's packed window attention equals transformers' per-window loop."""

import torch
import torch.nn.functional as F

from longcat_ray.model.prompt import prepare_vision, vl_image
from longcat_ray.model.vision import pack_vision_attention, packed_attention, pad_mlp
from tests.conftest import reference_image


def test_packed_attention_equals_one_call_per_segment():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 23, 2, 8).unbind(0)
    cu = torch.tensor([0, 8, 16, 20, 23])  # uneven segments, as the windows at an image's edge
    expected = torch.cat([
        F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), scale=0.3).transpose(0, 1)
        for a, b in zip(cu[:-1], cu[1:])
    ])
    torch.testing.assert_close(packed_attention(q, k, v, cu, 0.3), expected)
    even = torch.tensor([0, 8, 16])
    torch.testing.assert_close(packed_attention(q[:16], k[:16], v[:16], even, 0.3), expected[:16])


def test_packed_tower_equals_transformers(tiny, tiny_pipe):
    from longcat_ray.inference import load_pipeline

    pipe = load_pipeline(str(tiny.model), device="cpu")  # its own copy: the session's pipeline stays as loaded
    images = [vl_image(reference_image(tiny, i), 400, 304) for i in range(2)]  # an uneven window grid
    pixels, grid = prepare_vision(pipe.text_processor.image_processor, images)
    assert int(grid[0, 1] // 2) % 4 and int(grid[0, 2] // 2) % 4
    stock = tiny_pipe.text_encoder.model.visual(pixels, grid_thw=grid).pooler_output
    packed = pipe.text_encoder.model.visual(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-4)
    assert pack_vision_attention(pipe.text_encoder) == len(pipe.text_encoder.model.visual.blocks)


def test_padded_mlp_is_the_same_function(tiny_pipe):
    import copy

    mlp = tiny_pipe.text_encoder.model.visual.blocks[0].mlp
    wider = copy.deepcopy(mlp)
    assert pad_mlp(wider, 48) and wider.up_proj.out_features == 96 > mlp.up_proj.out_features
    assert not pad_mlp(wider, 48)
    x = torch.randn(5, mlp.up_proj.in_features)
    torch.testing.assert_close(wider(x), mlp(x), atol=1e-6, rtol=1e-5)
