"""Prompt encoding of (instruction, reference) against the pipeline's own encode_prompt.

The pipeline's reference runs with Qwen2.5-VL's multimodal positions (`with_mrope`): on transformers >= 5.15
its code alone falls back to 1D positions, which the last test shows conditions differently.
"""

import pytest
import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions

from longcat_ray.buckets import resize_image
from longcat_ray.model.prompt import (
    MAX_INSTRUCTION_TOKENS,
    PAD_POSITION,
    build_prompt_inputs,
    encode_prompt_inputs,
    encode_prompts,
    gather_rows,
    padding_slots,
    pipeline_prompt_encoder,
    prepare_vision,
    rope_positions,
    shared_prefix,
    tokenize_instruction,
    vl_image,
)
from tests.conftest import reference_image, with_mrope

INSTRUCTIONS = ["swap the red and blue colours", 'write "Hi" on the wall', ""]


def recorded_pipeline_prompt(pipe, reference, prompt):
    """Run the real pipeline for one step and record what its encode_prompt received and returned."""
    calls = []
    original = pipe.encode_prompt

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs["image"], out[0]))
        return out

    pipe.encode_prompt = spy
    try:
        pipe(reference, prompt, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        del pipe.encode_prompt
    return calls[0]


def test_prompt_embeds_equal_the_pipelines_inside_an_edit(tiny, tiny_pipe):
    reference = reference_image(tiny, 1)  # 224x144: a non-square aspect ratio
    with with_mrope(tiny_pipe):
        vl_seen, embeds_seen = recorded_pipeline_prompt(tiny_pipe, reference, INSTRUCTIONS[0])
    width, height = calculate_dimensions(1024 * 1024, reference.width / reference.height)
    ours_vl = vl_image(reference, width, height)
    assert ours_vl.size == vl_seen.size == (width // 2, height // 2)
    ours = encode_prompts(*pipeline_prompt_encoder(tiny_pipe), [INSTRUCTIONS[0]], [ours_vl])
    torch.testing.assert_close(ours, embeds_seen)
    # the reference at full size (SimpleTuner's way) conditions differently
    full = resize_image(reference, width, height)
    wrong = encode_prompts(*pipeline_prompt_encoder(tiny_pipe), [INSTRUCTIONS[0]], [full])
    assert wrong.shape != ours.shape or not torch.allclose(wrong, ours)


def test_batched_encoding_equals_one_at_a_time(tiny, tiny_pipe):
    images = [vl_image(reference_image(tiny, i), 128, 96) for i in range(3)]
    batch = encode_prompts(*pipeline_prompt_encoder(tiny_pipe), INSTRUCTIONS, images)
    vision_tokens = batch.shape[1] - 2 - MAX_INSTRUCTION_TOKENS
    assert vision_tokens > 0
    for i, (text, image) in enumerate(zip(INSTRUCTIONS, images)):
        with with_mrope(tiny_pipe):
            theirs, _ = tiny_pipe.encode_prompt(prompt=text, image=image)
        torch.testing.assert_close(batch[i : i + 1], theirs, atol=1e-5, rtol=1e-4)


def test_blank_embedding_from_the_same_forward_equals_encoding_the_empty_instruction(tiny, tiny_pipe):
    encoder, tokenizer, processor = pipeline_prompt_encoder(tiny_pipe)
    images = [vl_image(reference_image(tiny, i), 128, 96) for i in range(2)]
    pixels, grid = prepare_vision(processor, images)
    embeds, blank = encode_prompt_inputs(encoder, tokenizer, INSTRUCTIONS[:2], pixels, grid, processor.merge_size, blank=True)
    torch.testing.assert_close(embeds, encode_prompts(encoder, tokenizer, processor, INSTRUCTIONS[:2], images))
    torch.testing.assert_close(blank, encode_prompts(encoder, tokenizer, processor, ["", ""], images), atol=1e-5, rtol=1e-4)
    assert encode_prompt_inputs(encoder, tokenizer, ["x"], pixels[: len(pixels) // 2], grid[:1], processor.merge_size)[1] is None


def test_positions_are_transformers_multimodal_rope_with_pads_at_one(tiny, tiny_pipe):
    encoder, processor = tiny_pipe.text_encoder, tiny_pipe.text_processor.image_processor
    _, grid = prepare_vision(processor, [vl_image(reference_image(tiny, i), 128, 96) for i in range(2)])
    tokens = [tokenize_instruction(tiny_pipe.tokenizer, text) for text in INSTRUCTIONS[:2]]
    ids, mask, _, _ = build_prompt_inputs(tiny_pipe.tokenizer, tokens, int(grid[0].prod()) // 4)
    ours = rope_positions(ids, mask, encoder.config.image_token_id, grid, processor.merge_size)
    types = (ids == encoder.config.image_token_id).int()
    theirs, _ = encoder.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=mask)
    real = mask.bool()
    assert torch.equal(ours[:, real], theirs[:, real])
    assert (ours[:, ~real] == PAD_POSITION).all() and (~real).sum() > 0
    image = ids[0] == encoder.config.image_token_id
    assert len(set(ours[1, 0, image].tolist())) > 1  # the image spans a 2D grid, not a 1D run


def test_padding_slots_keep_real_slots_and_repeat_the_pad_state():
    hidden = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)  # row 0: 2 real + 2 pads; row 1: left-padded
    short = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    full = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    out = gather_rows(hidden, padding_slots(short, full))[..., 0]
    assert out.tolist() == [[0, 1, 2, 2, 2, 2], [4, 4, 4, 5, 6, 7]]


def test_the_pipeline_on_1d_positions_conditions_differently(tiny, tiny_pipe):
    image = vl_image(reference_image(tiny, 0), 128, 96)
    ours = encode_prompts(*pipeline_prompt_encoder(tiny_pipe), INSTRUCTIONS[:1], [image])
    fallback, _ = tiny_pipe.encode_prompt(prompt=INSTRUCTIONS[0], image=image)
    assert not torch.allclose(ours, fallback, atol=1e-3)


def test_quoted_text_is_tokenised_per_character(tiny_pipe):
    tok = tiny_pipe.tokenizer
    quoted = tokenize_instruction(tok, 'write "the" here')
    plain = tokenize_instruction(tok, "write the here")
    assert len(quoted) > len(plain)
    assert len(tokenize_instruction(tok, "a " * 2000)) == MAX_INSTRUCTION_TOKENS


def test_mixed_sizes_in_one_batch_are_refused(tiny, tiny_pipe):
    images = [vl_image(reference_image(tiny), 128, 96), vl_image(reference_image(tiny), 96, 128)]
    with pytest.raises(ValueError, match="one size"):
        encode_prompts(*pipeline_prompt_encoder(tiny_pipe), ["a", "b"], images)


def test_shared_prefix_stops_at_the_first_difference_mask_or_image_token():
    ids = torch.tensor([[5, 6, 7, 9, 9, 3], [5, 6, 7, 9, 9, 4]])
    ones = torch.ones_like(ids)
    assert shared_prefix(ids, ones, image_token_id=9) == 3  # the image's tokens differ in their embeddings
    assert shared_prefix(ids, ones, image_token_id=100) == 5
    assert shared_prefix(ids, torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]), image_token_id=100) == 2
    assert shared_prefix(ids.flip(1), ones, image_token_id=100) == 0
