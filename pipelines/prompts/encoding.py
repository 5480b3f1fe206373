"""Turn prompts into text-encoder conditioning the way A1111 does (docs/compatibility.md §6).

- Prompts of any length: 75-token chunks, each wrapped in BOS/EOS and padded to 77, encoded
  separately and concatenated. A chunk boundary moves back to the last comma when that comma is
  within 20 tokens of it; ``BREAK`` starts a new chunk.
- Emphasis the A1111 "Original" way: the encoder output of each chunk is multiplied by the token
  weights, then rescaled so that its mean is what it was before.
- Clip skip in A1111 numbering (1 = last layer). SDXL starts from the penultimate layer.
- Textual inversion vectors replace the tokens of an embedding's name.
- :func:`build_conditioning` schedules prompt editing per step and caches every distinct text.

Extra-network tags must already be removed (:func:`pipelines.prompts.parser.extract_extra_networks`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from pipelines.prompts.embeddings import (
    SINGLE_KEY,
    EmbeddingDatabase,
    TextualInversion,
    format_ti_hashes,
)
from pipelines.prompts.parser import (
    BREAK_MARKER,
    extract_extra_networks,
    get_prompt_schedule,
    parse_prompt_attention,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
# Token id standing in for an embedding vector; it is replaced before the transformer sees it.
_PLACEHOLDER_ID = 0


@dataclass
class PromptChunk:
    """Up to 75 tokens of one prompt (without BOS/EOS) with their weights and embedding slots."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, TextualInversion]] = field(default_factory=list)  # (offset in tokens, embedding)


@dataclass
class TokenizedPrompt:
    """A prompt split into chunks, and the embeddings it names (in order of first use)."""

    chunks: list[PromptChunk]
    embeddings_used: list[TextualInversion]

    @property
    def token_count(self) -> int:
        """A1111's count: 75 for every chunk but the last, plus the last chunk's tokens."""
        return CHUNK_LENGTH * (len(self.chunks) - 1) + len(self.chunks[-1].tokens)

    @property
    def token_limit(self) -> int:
        """75 per chunk, the number shown after the slash in ``80/150``."""
        return CHUNK_LENGTH * len(self.chunks)


class _EmbeddingIndex:
    """Embeddings usable with one set of text encoders, keyed by the first token of their name."""

    def __init__(self, tokenizer, items: Sequence[TextualInversion], keys: Sequence[str], dims: Sequence[int]):
        self.by_first_token: dict[int, list[tuple[tuple[int, ...], TextualInversion]]] = {}
        self.loaded = [item for item in items if _fits(item, keys, dims)]
        self.skipped = [item for item in items if not _fits(item, keys, dims)]
        if not self.loaded:
            return
        names = [item.name for item in self.loaded]
        id_lists = tokenizer(names, add_special_tokens=False, verbose=False)["input_ids"]
        for item, ids in zip(self.loaded, id_lists, strict=True):
            if ids:
                self.by_first_token.setdefault(ids[0], []).append((tuple(ids), item))
        for candidates in self.by_first_token.values():
            candidates.sort(key=lambda pair: len(pair[0]), reverse=True)  # longest name wins

    def match(self, ids: Sequence[int], position: int) -> tuple[TextualInversion, int] | None:
        for name_ids, item in self.by_first_token.get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return item, len(name_ids)
        return None


def _fits(item: TextualInversion, keys: Sequence[str], dims: Sequence[int]) -> bool:
    return all(key in item.vectors and item.vectors[key].shape[1] == dim for key, dim in zip(keys, dims, strict=True))


def _comma_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(",</w>")
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
        return token_id
    return tokenizer(",", add_special_tokens=False)["input_ids"][0]


def tokenize_prompt(tokenizer, text: str, embeddings: _EmbeddingIndex | None = None) -> TokenizedPrompt:
    """Split one schedule-resolved prompt into weighted 75-token chunks (no model call)."""
    parsed = parse_prompt_attention(text)
    texts = [piece for piece, weight in parsed if (piece, weight) != BREAK_MARKER]
    id_lists = iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
    comma = _comma_id(tokenizer)

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    last_comma = -1
    used: dict[str, TextualInversion] = {}

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for piece, weight in parsed:
        if (piece, weight) == BREAK_MARKER:
            close_chunk()
            continue
        ids = next(id_lists)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_LENGTH and last_comma >= CHUNK_LENGTH - COMMA_BACKTRACK:
                # Keep the words after the last comma together in the next chunk.
                cut = last_comma + 1
                moved = PromptChunk(
                    chunk.tokens[cut:],
                    chunk.weights[cut:],
                    [(offset - cut, item) for offset, item in chunk.fixes if offset >= cut],
                )
                chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                chunk.fixes = [(offset, item) for offset, item in chunk.fixes if offset < cut]
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK_LENGTH:
                close_chunk()

            found = embeddings.match(ids, position) if embeddings else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            item, name_length = found
            if item.vector_count > CHUNK_LENGTH:
                raise ValueError(f"embedding {item.name!r} has {item.vector_count} vectors, more than {CHUNK_LENGTH}")
            if len(chunk.tokens) + item.vector_count > CHUNK_LENGTH:
                close_chunk()
            chunk.fixes.append((len(chunk.tokens), item))
            chunk.tokens.extend([_PLACEHOLDER_ID] * item.vector_count)
            chunk.weights.extend([weight] * item.vector_count)
            used.setdefault(item.name, item)
            position += name_length

    if chunk.tokens or not chunks:
        close_chunk()
    return TokenizedPrompt(chunks, list(used.values()))


class PromptEncoder:
    """Encodes prompts with one or two CLIP text encoders (SD 1.x / SD 2.x, or SDXL and SD 3.5's CLIP part).

    ``penultimate`` selects SDXL's convention: clip skip 1 is the penultimate hidden state, with
    no final layer norm, and the pooled output of the last encoder (the one with a projection)
    is returned. ``embedding_keys`` names the textual-inversion vectors each encoder takes.

    Textual inversion vectors are inserted by a forward hook on the token-embedding layer that
    lives only for the duration of one encoder call, so do not run two encodes on the same text
    encoder concurrently.
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence[PreTrainedModel],
        *,
        penultimate: bool = False,
        embedding_keys: Sequence[str] | None = None,
        embeddings: EmbeddingDatabase | None = None,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        if not text_encoders or len(tokenizers) != len(text_encoders):
            raise ValueError("need one tokenizer per text encoder, and at least one of each")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.penultimate = penultimate
        self.embedding_keys = tuple(embedding_keys or [SINGLE_KEY] * len(text_encoders))
        if len(self.embedding_keys) != len(self.text_encoders):
            raise ValueError("need one embedding key per text encoder")
        self.embeddings = embeddings
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._index: _EmbeddingIndex | None = None
        self._index_generation = -1

    @classmethod
    def from_pipeline(cls, pipe, embeddings: EmbeddingDatabase | None = None) -> PromptEncoder:
        """Build from a loaded diffusers pipeline (SD 1.x, SD 2.x, SDXL base or refiner, SD 3.5's CLIP-L + G)."""
        is_sdxl = hasattr(pipe, "text_encoder_2")
        pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None), "clip_l")]
        if is_sdxl:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"))
        pairs = [pair for pair in pairs if pair[0] is not None and pair[1] is not None]
        return cls(
            [pair[0] for pair in pairs],
            [pair[1] for pair in pairs],
            penultimate=is_sdxl,
            embedding_keys=[pair[2] for pair in pairs] if is_sdxl else None,
            embeddings=embeddings,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        )

    @property
    def tokenizer(self):
        """The tokenizer used for splitting prompts (all CLIP tokenizers share one vocabulary)."""
        return self.tokenizers[0]

    def _embedding_index(self) -> _EmbeddingIndex | None:
        if self.embeddings is None:
            return None
        if self._index is None or self._index_generation != self.embeddings.generation:
            dims = [encoder.config.hidden_size for encoder in self.text_encoders]
            self._index = _EmbeddingIndex(self.tokenizer, self.embeddings.items(), self.embedding_keys, dims)
            self._index_generation = self.embeddings.generation
        return self._index

    def embedding_status(self) -> tuple[list[TextualInversion], list[TextualInversion]]:
        """Embeddings that fit these text encoders, and those that do not (other model family)."""
        index = self._embedding_index()
        return (index.loaded, index.skipped) if index else ([], [])

    def tokenize(self, text: str) -> TokenizedPrompt:
        """Chunk one schedule-resolved prompt, recognising embedding names."""
        return tokenize_prompt(self.tokenizer, text, self._embedding_index())

    def max_clip_skip(self) -> int:
        """The largest clip skip every encoder supports."""
        layers = min(encoder.config.num_hidden_layers for encoder in self.text_encoders)
        return layers - 1 if self.penultimate else layers

    def encode(self, text: str, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode one schedule-resolved prompt into ``(embeds (1, 77*k, D), pooled (1, P) | None)``."""
        return self.encode_tokenized(self.tokenize(text), clip_skip)

    @torch.no_grad()
    def encode_tokenized(
        self, prompt: TokenizedPrompt, clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode an already chunked prompt; all chunks go through each encoder in one batch."""
        if not 1 <= clip_skip <= self.max_clip_skip():
            raise ValueError(f"clip_skip must be between 1 and {self.max_clip_skip()}, got {clip_skip}")
        outputs, pooled = [], []
        for tokenizer, encoder, key in zip(self.tokenizers, self.text_encoders, self.embedding_keys, strict=True):
            hidden, encoder_pooled = self._run_encoder(tokenizer, encoder, key, prompt.chunks, clip_skip)
            outputs.append(_apply_emphasis(hidden, prompt.chunks))
            if encoder_pooled is not None:
                pooled.append(encoder_pooled[:1])  # A1111 takes the pooled output of the first chunk
        embeds = torch.cat(outputs, dim=-1)  # (chunks, 77, D)
        # The projected pooled outputs side by side: CLIP-G's alone for SDXL (its CLIP-L has no projection),
        # CLIP-L's then CLIP-G's for SD 3.5.
        return embeds.reshape(1, -1, embeds.shape[-1]), torch.cat(pooled, dim=-1) if pooled else None

    def _run_encoder(self, tokenizer, encoder, key: str, chunks: list[PromptChunk], clip_skip: int):
        device = get_module_execution_device(encoder)
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        rows = [[bos, *chunk.tokens, eos] + [pad] * (CHUNK_LENGTH - len(chunk.tokens)) for chunk in chunks]
        input_ids = torch.tensor(rows, dtype=torch.long, device=device)
        slots = [
            (row, 1 + offset, item.vectors[key])
            for row, chunk in enumerate(chunks)
            for offset, item in chunk.fixes
        ]

        def insert_vectors(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for row, start, vectors in slots:
                output[row, start : start + vectors.shape[0]] = vectors.to(output.device, output.dtype)
            return output

        hook = encoder.get_input_embeddings().register_forward_hook(insert_vectors) if slots else None
        try:
            result = encoder(input_ids, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()

        if self.penultimate:
            hidden = result.hidden_states[-(clip_skip + 1)]
        elif clip_skip == 1:
            hidden = result.last_hidden_state
        else:
            text_model = getattr(encoder, "text_model", encoder)
            hidden = text_model.final_layer_norm(result.hidden_states[-clip_skip])
        pooled = getattr(result, "text_embeds", None)
        return hidden, pooled


def _apply_emphasis(hidden: torch.Tensor, chunks: list[PromptChunk]) -> torch.Tensor:
    """A1111 "Original" emphasis: scale each token by its weight, then restore the chunk's mean."""
    if all(weight == 1.0 for chunk in chunks for weight in chunk.weights):
        return hidden
    rows = [[1.0, *chunk.weights] + [1.0] * (CHUNK_LENGTH + 1 - len(chunk.weights)) for chunk in chunks]
    weights = torch.tensor(rows, dtype=torch.float32, device=hidden.device)[..., None]
    original_mean = hidden.float().mean(dim=(1, 2), keepdim=True)
    weighted = hidden.float() * weights
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A mean of exactly zero cannot be restored by scaling; leave such a chunk merely weighted.
    scale = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / new_mean)
    return (weighted * scale).to(hidden.dtype)


# --------------------------------------------------------------------------- per-job conditioning


@dataclass(frozen=True)
class StepConditioning:
    """What the denoiser gets at one sampling step: one row per image of the batch."""

    cond: torch.Tensor  # (B, T, D)
    uncond: torch.Tensor  # (B, T, D), same T as cond
    pooled: torch.Tensor | None  # (B, P), SDXL only
    uncond_pooled: torch.Tensor | None


@dataclass
class Conditioning:
    """Conditioning for every step of one job, precomputed per change of any prompt's schedule.

    ``at_step(i)`` (0-based sampling step) returns the same objects for every step between two
    changes; ``changes_at`` holds the steps where they change (always including 0).
    """

    starts: list[int]
    segments: list[StepConditioning]
    prompt_schedules: list[list[tuple[int, str]]]
    negative_schedules: list[list[tuple[int, str]]]
    embeddings_used: list[TextualInversion]

    @property
    def changes_at(self) -> set[int]:
        """0-based sampling steps at which the conditioning differs from the step before (and 0)."""
        return set(self.starts)

    def at_step(self, step: int) -> StepConditioning:
        """Conditioning for 0-based sampling step ``step``; steps past the end get the last one."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.segments[bisect.bisect_right(self.starts, step) - 1]

    @property
    def ti_hashes(self) -> str | None:
        """Infotext value for ``TI hashes``, or None when no embedding was used."""
        return format_ti_hashes(self.embeddings_used)


def text_at(schedule: list[tuple[int, str]], step_number: int) -> str:
    """The text a prompt schedule gives at sampling step ``step_number`` (1-based)."""
    for end, text in schedule:
        if end >= step_number:
            return text
    return schedule[-1][1]


def build_conditioning(
    encoder: PromptEncoder,
    prompts: list[str],
    negative_prompts: list[str],
    steps: int,
    clip_skip: int = 1,
) -> Conditioning:
    """Encode a batch's prompts and negative prompts with prompt editing resolved per step.

    Each distinct text is encoded once. Every tensor is padded with encodings of the empty prompt
    to the largest chunk count in the job so that cond and uncond can be batched for CFG. For SDXL
    models with ``force_zeros_for_empty_prompt``, an all-empty negative prompt gives zeros (A1111
    and diffusers do the same).
    """
    if not prompts or len(prompts) != len(negative_prompts):
        raise ValueError(f"need one negative prompt per prompt, got {len(prompts)} and {len(negative_prompts)}")
    prompt_schedules = [get_prompt_schedule(prompt, steps) for prompt in prompts]
    negative_schedules = [get_prompt_schedule(prompt, steps) for prompt in negative_prompts]

    encoded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    used: dict[str, TextualInversion] = {}
    for schedule in prompt_schedules + negative_schedules + [[(steps, "")]]:
        for _, text in schedule:
            if text not in encoded:
                tokenized = encoder.tokenize(text)
                for item in tokenized.embeddings_used:
                    used.setdefault(item.name, item)
                encoded[text] = encoder.encode_tokenized(tokenized, clip_skip)
    empty_embeds = encoded[""][0]

    zero_uncond = encoder.force_zeros_for_empty_prompt and all(prompt == "" for prompt in negative_prompts)
    zeros = (torch.zeros_like(empty_embeds), _zeros_or_none(encoded[""][1]))
    chunk_tokens = empty_embeds.shape[1]
    longest = max(embeds.shape[1] for embeds, _ in encoded.values())

    padded: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def padded_encoding(text: str, negative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (text, negative and zero_uncond)
        if key not in padded:
            embeds, pooled = zeros if key[1] else encoded[text]
            missing = (longest - embeds.shape[1]) // chunk_tokens
            if missing:
                embeds = torch.cat([embeds, empty_embeds.repeat(1, missing, 1)], dim=1)
            padded[key] = (embeds, pooled)
        return padded[key]

    step_numbers = {0} | {end for schedule in prompt_schedules + negative_schedules for end, _ in schedule[:-1]}
    starts: list[int] = []
    segments: list[StepConditioning] = []
    previous_texts = None
    for start in sorted(step_numbers):
        texts = (
            tuple(text_at(schedule, start + 1) for schedule in prompt_schedules),
            tuple(text_at(schedule, start + 1) for schedule in negative_schedules),
        )
        if texts == previous_texts:
            continue
        previous_texts = texts
        cond = [padded_encoding(text, False) for text in texts[0]]
        uncond = [padded_encoding(text, True) for text in texts[1]]
        starts.append(start)
        segments.append(
            StepConditioning(
                cond=torch.cat([embeds for embeds, _ in cond]),
                uncond=torch.cat([embeds for embeds, _ in uncond]),
                pooled=_cat_or_none([pooled for _, pooled in cond]),
                uncond_pooled=_cat_or_none([pooled for _, pooled in uncond]),
            )
        )
    return Conditioning(starts, segments, prompt_schedules, negative_schedules, list(used.values()))


def _zeros_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else torch.zeros_like(tensor)


def _cat_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [tensor for tensor in tensors if tensor is not None]
    if not present:
        return None
    if len(present) != len(tensors):
        raise ValueError("pooled prompt embeddings: some prompts of the batch have them and others do not")
    return torch.cat(present)


# --------------------------------------------------------------------------- token counter


def count_tokens(encoder_or_tokenizer, prompt: str, steps: int = 20) -> tuple[int, int]:
    """Token count and limit for the UI counter (``13/75``, ``80/150``); no model is run.

    Extra-network tags are ignored and, as in A1111, the longest text of the prompt's schedule is
    counted. The limit is 75 per chunk the prompt will actually use (``BREAK`` and comma
    backtracking included).
    """
    text, _ = extract_extra_networks(prompt)
    if isinstance(encoder_or_tokenizer, PromptEncoder):
        tokenize = encoder_or_tokenizer.tokenize
    else:
        def tokenize(text: str) -> TokenizedPrompt:
            return tokenize_prompt(encoder_or_tokenizer, text)
    best: TokenizedPrompt | None = None
    for scheduled in dict.fromkeys(text for _, text in get_prompt_schedule(text, steps)):
        tokenized = tokenize(scheduled)
        if best is None or tokenized.token_count > best.token_count:
            best = tokenized
    if best is None:
        raise ValueError(f"prompt {prompt!r}: its schedule holds no text to count")
    return best.token_count, best.token_limit
