"""Prompt encoding of (instruction, reference image) with the Qwen2.5-VL text encoder.

Same token layout as diffusers' LongCatImageEditPipeline._encode_prompt, batched: every sample in a
batch must have a VL image of the same size (one aspect bucket), so all sequences have one length.

Two differences from running the pipeline's code on transformers >= 5.15, both deliberate:
- Position ids are computed here (`rope_positions`): Qwen2.5-VL's multimodal 3D RoPE over the reference's
  patch grid, padded positions at 1, as transformers 4.x computed them when LongCat was trained. transformers
  >= 5.15 needs `mm_token_type_ids` for that and, without it (the pipeline does not pass it), silently falls
  back to 1D positions (diffusers issue #14194 for the Qwen-Image pipelines).
- The instruction's padding is encoded once, not up to 512 times (`encode_prompt_inputs`): a padded position
  is masked as a key, and every one of them has the same token, the same position and sees the same keys, so
  all of them carry the same hidden state. The embedding is rebuilt at full length (vision + 2 + 512) after.

The system prompt's keys and values are computed once per batch (`run_language_model`); that changes nothing
but bf16 rounding. CPU and GPU work are apart (`prompt_batch`, `encode_prompt_batch`) so the cache stage can
overlap them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from longcat_ray.buckets import resize_image

SYSTEM_PREFIX = (
    "<|im_start|>system\nAs an image editing expert, first analyze the content and attributes of the input "
    "image(s). Then, based on the user's editing instructions, clearly and precisely determine how to modify "
    "the given image(s), ensuring that only the specified parts are altered and all other aspects remain "
    "consistent with the original(s).<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
)
SYSTEM_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_TOKEN = "<|image_pad|>"
MAX_INSTRUCTION_TOKENS = 512
# Part of every cached text entry's key: a change to how prompts are encoded re-encodes the text cache.
PROMPT_ENCODING = "mrope-4x-pads1-compact"
PAD_POSITION = 1  # transformers 4.x's position id for padded tokens (get_rope_index starts from ones)


def vl_image(reference: Image.Image, width: int, height: int) -> Image.Image:
    """The copy of the reference the VL encoder sees: the reference at the target size, then halved."""
    return resize_image(resize_image(reference, width, height), width // 2, height // 2)


def tokenize_instruction(tokenizer, instruction: str) -> list[int]:
    """Instruction -> token ids; quoted spans are tokenised character by character (LongCat's rule)."""
    # imported here: the pipeline module pulls in diffusers and transformers (~3-6 s on a 2-core machine), which
    # every Ray worker that reads or checks the cache would pay for nothing
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import split_quotation

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


def pad_instructions(tokenizer, instruction_ids: list[list[int]], length: int) -> dict[str, torch.Tensor]:
    """-> {"input_ids", "attention_mask"} [b, length], padded by the tokenizer's own `pad` (side and pad id)."""
    return tokenizer.pad(
        {"input_ids": instruction_ids}, max_length=length, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )


def build_prompt_inputs(
    tokenizer, instruction_ids: list[list[int]], image_tokens: int, pad_to: int = MAX_INSTRUCTION_TOKENS
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Tokenised instructions -> (input_ids [b, L], attention_mask [b, L], slice start, suffix length).

    L = prefix + pad_to + suffix; the instruction is padded to `pad_to` (512 in the pipeline) by the
    tokenizer's own `pad` (its padding side and pad id), with a zero mask.
    """
    prefix, suffix, start = prompt_layout(tokenizer, image_tokens)
    padded = pad_instructions(tokenizer, instruction_ids, pad_to)
    b = len(instruction_ids)
    prefix_ids, suffix_ids = torch.tensor([prefix] * b), torch.tensor([suffix] * b)
    input_ids = torch.cat([prefix_ids, padded["input_ids"], suffix_ids], dim=1)
    mask = torch.cat([torch.ones_like(prefix_ids), padded["attention_mask"], torch.ones_like(suffix_ids)], dim=1)
    return input_ids, mask, start, len(suffix)


def rope_positions(input_ids: torch.Tensor, mask: torch.Tensor, image_token_id: int, grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[b, L] ids with one image block per row -> Qwen2.5-VL position ids [3, b, L] (temporal, height, width).

    Text tokens count up on all three axes; the image's tokens sit on its merged patch grid, offset by the text
    before it; the text after continues from that offset + max(grid h, grid w). Padded tokens get PAD_POSITION.
    """
    positions = torch.full((3, *input_ids.shape), PAD_POSITION, dtype=torch.long)
    for row, (ids, keep) in enumerate(zip(input_ids, mask.bool())):
        valid = ids[keep]
        image = (valid == image_token_id).nonzero().flatten()
        before, count = int(image[0]), len(image)
        _, h, w = (int(v) for v in grid_thw[row])
        h, w = h // merge_size, w // merge_size
        grid = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
        after = torch.arange(len(valid) - before - count) + before + max(h, w)
        parts = [torch.arange(before).expand(3, -1), grid + before, after.expand(3, -1)]
        positions[:, row, keep] = torch.cat(parts, dim=1)
    return positions


def padding_slots(mask: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
    """Where each instruction slot of the full padding takes its state from, in an encoding with few pads.

    mask [b, P] (few pads), full_mask [b, F] -> index [b, F] into P: the k-th unmasked slot takes the k-th
    unmasked position, every masked slot the row's first masked (pad) position.
    """
    index = torch.zeros(full_mask.shape, dtype=torch.long)
    for row, (short, full) in enumerate(zip(mask.bool(), full_mask.bool())):
        index[row, full] = short.nonzero().flatten()
        if (~full).any():
            index[row, ~full] = int((~short).nonzero()[0])
    return index


def gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [b, P, d], index [b, F] -> [b, F, d]."""
    return rows.gather(1, index.to(rows.device)[..., None].expand(-1, -1, rows.shape[-1]))


@dataclass(kw_only=True)
class PromptStates:
    """A bucket's prompt embeddings as encoded, before the instruction slots are expanded to 512.

    The cache stores them compactly (`compact`): the DiT consumes 512 instruction slots, most of them copies of
    one pad state, so an entry holds each distinct row once plus the slot -> row index (`expand_compact`).
    """

    head: torch.Tensor  # [b, vision tokens + 2, d]: <|vision_start|> ... <|vision_end|>
    rest: torch.Tensor  # [b, P, d]: the instruction positions as encoded
    slots: torch.Tensor  # [b, 512]: the `rest` row of each instruction slot
    blank: torch.Tensor | None  # [b, 1, d]: the empty instruction's pad state (all its 512 slots), if encoded

    def cpu(self) -> PromptStates:
        blank = self.blank.cpu() if self.blank is not None else None
        return PromptStates(head=self.head.cpu(), rest=self.rest.cpu(), slots=self.slots.cpu(), blank=blank)

    def embeds(self) -> torch.Tensor:
        """[b, vision tokens + 2 + 512, d], as the pipeline's encode_prompt returns."""
        return torch.cat([self.head, gather_rows(self.rest, self.slots)], dim=1)

    def blank_embeds(self) -> torch.Tensor | None:
        if self.blank is None:
            return None
        return torch.cat([self.head, self.blank.expand(-1, MAX_INSTRUCTION_TOKENS, -1)], dim=1)

    def compact(self, i: int) -> dict[str, torch.Tensor]:
        """Sample i -> {"prompt_embeds": [vision tokens + 2 + u, d], "prompt_slots": [512]} (u distinct rows)."""
        used, slots = torch.unique(self.slots[i], return_inverse=True)
        return {"prompt_embeds": torch.cat([self.head[i], self.rest[i, used.to(self.rest.device)]]), "prompt_slots": slots.int()}

    def compact_blank(self, i: int) -> dict[str, torch.Tensor]:
        assert self.blank is not None
        slots = torch.zeros(MAX_INSTRUCTION_TOKENS, dtype=torch.int32)
        return {"prompt_embeds": torch.cat([self.head[i], self.blank[i]]), "prompt_slots": slots}


def expand_compact(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    """A compact prompt entry (PromptStates.compact) -> its embedding [vision tokens + 2 + 512, d]."""
    rows, slots = entry["prompt_embeds"], entry["prompt_slots"].long()
    distinct = int(slots.max()) + 1
    return torch.cat([rows[:-distinct], rows[-distinct:][slots.to(rows.device)]])


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


@dataclass(kw_only=True)
class PromptBatch:
    """The token side of one bucket's prompts, built on the CPU (`prompt_batch`); the GPU side is
    `encode_prompt_batch`. Columns: the system prompt, <|vision_start|> at `start`, the image's tokens,
    <|vision_end|>, (with `blank`, one masked pad), the instructions padded to the longest + 1; no suffix."""

    ids: torch.Tensor  # [b, L]
    mask: torch.Tensor  # [b, L]
    positions: torch.Tensor  # [3, b, L]: rope_positions
    start: int  # column of <|vision_start|>: the embedding starts here
    head: int  # first column after <|vision_end|>
    blank: bool
    slots: torch.Tensor  # [b, 512]: padding_slots of the instruction columns


def prompt_batch(
    tokenizer, instructions: list[str], grid_thw: torch.Tensor, merge_size: int, image_token_id: int, blank: bool = False
) -> PromptBatch:
    """Instructions + the VL images' patch grids (one bucket) -> their PromptBatch (CPU work only).

    The suffix is left out (nothing before it depends on it); the instructions are padded to the longest + 1
    and expanded after (module docstring); the blank instruction's state is one more masked pad right after
    the image, which sees the prefix alone, as every pad of an empty instruction does.
    """
    image_tokens = int(grid_thw[0].prod()) // merge_size**2
    tokens = [tokenize_instruction(tokenizer, text) for text in instructions]
    pad_to = min(MAX_INSTRUCTION_TOKENS, max(map(len, tokens)) + 1)
    ids, mask, start, suffix_len = build_prompt_inputs(tokenizer, tokens, image_tokens, pad_to)
    head = start + 2 + image_tokens  # <|vision_start|>, image, <|vision_end|> end here in every layout
    ids, mask = ids[:, :-suffix_len], mask[:, :-suffix_len]
    if blank:
        ids = torch.cat([ids[:, :head], torch.full_like(ids[:, :1], tokenizer.pad_token_id), ids[:, head:]], dim=1)
        mask = torch.cat([mask[:, :head], torch.zeros_like(mask[:, :1]), mask[:, head:]], dim=1)
    full_mask = pad_instructions(tokenizer, tokens, MAX_INSTRUCTION_TOKENS)["attention_mask"]  # the pipeline's layout
    return PromptBatch(
        ids=ids,
        mask=mask,
        positions=rope_positions(ids, mask, image_token_id, grid_thw, merge_size),
        start=start,
        head=head,
        blank=blank,
        slots=padding_slots(mask[:, head + blank :], full_mask),
    )


@torch.no_grad()
def encode_prompt_batch(text_encoder, batch: PromptBatch, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> PromptStates:
    """A PromptBatch + its prepared VL inputs -> PromptStates: the last hidden state from <|vision_start|> on."""
    hidden = run_language_model(text_encoder, batch.ids, batch.mask, batch.positions, pixel_values, grid_thw, batch.start)
    head = batch.head - batch.start  # hidden starts at <|vision_start|>
    return PromptStates(
        head=hidden[:, :head],
        rest=hidden[:, head + batch.blank :],
        slots=batch.slots,
        blank=hidden[:, head : head + 1] if batch.blank else None,
    )


def encode_prompt_inputs(
    text_encoder, tokenizer, instructions: list[str], pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge_size: int,
    blank: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Instructions + prepared VL inputs of one bucket -> (prompt embeddings [b, vision tokens + 2 + 512, d],
    with `blank` the embeddings of ("", same reference) [b, same, d], else None)."""
    batch = prompt_batch(tokenizer, instructions, grid_thw, merge_size, text_encoder.config.image_token_id, blank)
    states = encode_prompt_batch(text_encoder, batch, pixel_values, grid_thw)
    return states.embeds(), states.blank_embeds()


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor, image_token_id: int) -> int:
    """[b, L] -> how many leading columns every row shares (same token, unmasked) before the first image token."""
    same = (ids == ids[:1]).all(0) & mask.bool().all(0) & (ids[0] != image_token_id).int().cumprod(0).bool()
    return int(same.int().cumprod(0).sum())


def run_language_model(
    text_encoder, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, pixel_values, grid_thw, first: int = 0
) -> torch.Tensor:
    """[b, L] ids, mask, [3, b, L] positions + VL inputs -> last hidden states [b, L - first, d] from column
    `first` on (no LM head).

    The system prompt before the image is the same tokens at the same positions in every row, and causal
    attention makes its keys and values the same too: they are computed once, for one row, and shared by the
    batch (a prefix cache): 67 of ~300 tokens per row in the cache benchmark's 768² layout (text encoder 14.0 ->
    13.0 ms per pair on an H100). Only its columns up to `first`, whose states are not returned, are shared.
    """
    model, device = text_encoder.model, text_encoder.device
    shared = min(first, shared_prefix(ids, mask, text_encoder.config.image_token_id))
    cache = None
    if shared:
        cache = model.language_model(
            input_ids=ids[:1, :shared].to(device), position_ids=positions[:, :1, :shared].to(device), use_cache=True
        ).past_key_values
        cache.batch_repeat_interleave(len(ids))
    output = model(
        input_ids=ids[:, shared:].to(device),
        attention_mask=mask.to(device),
        position_ids=positions[:, :, shared:].to(device),
        past_key_values=cache,
        use_cache=cache is not None,
        pixel_values=pixel_values.to(device),
        image_grid_thw=grid_thw.to(device),
    )
    return output.last_hidden_state[:, first - shared :].detach()


def encode_prompts(
    text_encoder, tokenizer, image_processor, instructions: list[str], vl_images: list[Image.Image]
) -> torch.Tensor:
    """[b] instructions + [b] same-size VL images -> prompt embeddings [b, vision tokens + 2 + 512, d].

    The pipeline's own components: `pipe.tokenizer` and `pipe.text_processor.image_processor`.
    """
    pixel_values, grid_thw = prepare_vision(image_processor, vl_images)
    return encode_prompt_inputs(text_encoder, tokenizer, instructions, pixel_values, grid_thw, image_processor.merge_size)[0]
