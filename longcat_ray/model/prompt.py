"""Prompt encoding of (instruction, reference image) with the Qwen2.5-VL text encoder.

Same token layout as diffusers' LongCatImageEditPipeline._encode_prompt, batched: every sample in a
batch must have a VL image of the same size (one aspect bucket), so all sequences have one length.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import split_quotation
from PIL import Image

from longcat_ray.model.latents import resize_image

SYSTEM_PREFIX = (
    "<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the input "
    "image(s). Then, based on the user's editing instructions, clearly and precisely determine how to modify "
    "the given image(s), ensuring that only the specified parts are altered and all other aspects remain "
    "consistent with the original(s).<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
)
SYSTEM_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_TOKEN = "<|image_pad|>"
MAX_INSTRUCTION_TOKENS = 512


def vl_image(reference: Image.Image, width: int, height: int) -> Image.Image:
    """The copy of the reference the VL encoder sees: the reference at the target size, then halved."""
    return resize_image(resize_image(reference, width, height), width // 2, height // 2)


def tokenize_instruction(tokenizer, instruction: str) -> list[int]:
    """Instruction -> token ids; quoted spans are tokenised character by character (LongCat's rule)."""
    ids: list[int] = []
    for text, quoted in split_quotation(instruction):
        pieces = list(text) if quoted else [text]
        for piece in pieces:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids[:MAX_INSTRUCTION_TOKENS]


def prompt_layout(tokenizer, image_tokens: int) -> tuple[list[int], list[int], int]:
    """-> (prefix ids with the image placeholders expanded, suffix ids, index of <|vision_start|>)."""
    prefix_text = SYSTEM_PREFIX.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(SYSTEM_SUFFIX, add_special_tokens=False)["input_ids"]
    return prefix, suffix, prefix.index(tokenizer.convert_tokens_to_ids("<|vision_start|>"))


def build_prompt_inputs(tokenizer, instructions: list[str], image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """-> (input_ids [b, L], attention_mask [b, L], slice start, suffix length).

    L = prefix + 512 + suffix; the instruction is padded to 512 by the tokenizer's own `pad` (its padding
    side and pad id), with a zero mask, exactly as the pipeline does.
    """
    prefix, suffix, start = prompt_layout(tokenizer, image_tokens)
    padded = tokenizer.pad(
        {"input_ids": [tokenize_instruction(tokenizer, text) for text in instructions]},
        max_length=MAX_INSTRUCTION_TOKENS,
        padding="max_length",
        return_attention_mask=True,
        return_tensors="pt",
    )
    b = len(instructions)
    prefix_ids, suffix_ids = torch.tensor([prefix] * b), torch.tensor([suffix] * b)
    input_ids = torch.cat([prefix_ids, padded["input_ids"], suffix_ids], dim=1)
    mask = torch.cat([torch.ones_like(prefix_ids), padded["attention_mask"], torch.ones_like(suffix_ids)], dim=1)
    return input_ids, mask, start, len(suffix)


def pipeline_prompt_encoder(pipe) -> tuple:
    """(text_encoder, tokenizer, image_processor) of a LongCatImageEditPipeline, in encode_prompts' order."""
    return pipe.text_encoder, pipe.tokenizer, pipe.text_processor.image_processor


def prepare_vision(image_processor, vl_images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """[b] same-size VL images -> (pixel_values [b * patches, c * t * p * p], image_grid_thw [b, 3]).

    CPU work (resize to the patch grid, normalise, patchify): the cache stage runs it apart from the GPU.
    """
    if len({im.size for im in vl_images}) != 1:
        raise ValueError(f"encode_prompts needs VL images of one size (one bucket), got {sorted({im.size for im in vl_images})}")
    vision = image_processor(images=vl_images, return_tensors="pt")
    return vision["pixel_values"], vision["image_grid_thw"]


@torch.no_grad()
def encode_prompt_inputs(
    text_encoder, tokenizer, instructions: list[str], pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge_size: int
) -> torch.Tensor:
    """Instructions + prepared VL inputs of one bucket -> prompt embeddings [b, vision tokens + 2 + 512, d].

    The embedding is the last hidden state from <|vision_start|> up to (not including) the suffix.
    """
    image_tokens = int(grid_thw[0].prod()) // merge_size**2
    input_ids, mask, start, suffix_len = build_prompt_inputs(tokenizer, instructions, image_tokens)
    device = text_encoder.device
    output = text_encoder(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        pixel_values=pixel_values.to(device),
        image_grid_thw=grid_thw.to(device),
        output_hidden_states=True,
    )
    return output.hidden_states[-1][:, start:-suffix_len].detach()


def encode_prompts(
    text_encoder, tokenizer, image_processor, instructions: list[str], vl_images: list[Image.Image]
) -> torch.Tensor:
    """[b] instructions + [b] same-size VL images -> prompt embeddings [b, vision tokens + 2 + 512, d].

    The pipeline's own components: `pipe.tokenizer` and `pipe.text_processor.image_processor`.
    """
    pixel_values, grid_thw = prepare_vision(image_processor, vl_images)
    return encode_prompt_inputs(text_encoder, tokenizer, instructions, pixel_values, grid_thw, image_processor.merge_size)
