"""Prompt encoding on tiny random CLIP text encoders with the real (shipped) CLIP tokenizer."""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from pipelines.prompts.embeddings import EmbeddingDatabase, sha256_short
from pipelines.prompts.encoding import (
    CHUNK_LENGTH,
    PromptEncoder,
    build_conditioning,
    count_tokens,
)

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "models" / "configs"
TOKENS = 77


def _shipped_tokenizer(tmp_path_factory, family: str, subfolder: str) -> CLIPTokenizer:
    """The tokenizer a family ships: its tokenizer configs plus the shared CLIP BPE files."""
    folder = tmp_path_factory.mktemp(f"{family}-{subfolder}")
    for source in (CONFIGS / family / subfolder).iterdir():
        shutil.copy(source, folder / source.name)
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).exists():
            shutil.copy(CONFIGS / "clip_tokenizer" / name, folder / name)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _text_config(hidden: int = 32, projection: int = 32) -> CLIPTextConfig:
    # Sizes as in diffusers' own pipeline tests, with the real vocabulary and special token ids.
    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
        projection_dim=projection,
    )


def _text_encoder(cls: type, config: CLIPTextConfig) -> torch.nn.Module:
    model = cls(config).eval()
    # Fresh LayerNorms output rows of mean zero, which trained ones do not; emphasis rescales by the mean.
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias, std=0.5)
    return model


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        vae=None, unet=None, scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None,
        text_encoder=_text_encoder(CLIPTextModel, _text_config()),
        tokenizer=_shipped_tokenizer(tmp_path_factory, "sd15", "tokenizer"),
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> StableDiffusionPipeline:
    torch.manual_seed(1)
    return StableDiffusionPipeline(
        vae=None, unet=None, scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None, feature_extractor=None,
        text_encoder=_text_encoder(CLIPTextModel, _text_config()),
        tokenizer=_shipped_tokenizer(tmp_path_factory, "sd2", "tokenizer"),
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> StableDiffusionXLPipeline:
    torch.manual_seed(2)
    return StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=EulerDiscreteScheduler(steps_offset=1),
        text_encoder=_text_encoder(CLIPTextModel, _text_config()),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, _text_config(hidden=40, projection=24)),
        tokenizer=_shipped_tokenizer(tmp_path_factory, "sdxl", "tokenizer"),
        tokenizer_2=_shipped_tokenizer(tmp_path_factory, "sdxl", "tokenizer_2"),
    )


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(3)
    save_file({"emb_params": torch.randn(2, 32, generator=generator)}, folder / "myemb.safetensors")
    save_file(
        {"clip_l": torch.randn(3, 32, generator=generator), "clip_g": torch.randn(3, 40, generator=generator)},
        folder / "xlemb.safetensors",
    )
    return folder


def _chunks(embeds: torch.Tensor) -> list[torch.Tensor]:
    return list(embeds.split(TOKENS, dim=1))


def _same(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Equal up to float rounding: a chunk encoded in a batch of chunks differs in the last bits."""
    return left.shape == right.shape and torch.allclose(left, right, atol=1e-5, rtol=1e-5)


def _words(count: int, last: str = "cat") -> str:
    # "dog" and "cat" are one token each in the CLIP vocabulary.
    return " ".join(["dog"] * (count - 1) + [last])


# --------------------------------------------------------------------------- equality with diffusers


def test_plain_prompt_equals_diffusers_sd1(sd1):
    prompt_embeds, negative_embeds = sd1.encode_prompt("a photo of a cat", "cpu", 1, True, "ugly, blurry")
    step = build_conditioning(PromptEncoder.from_pipeline(sd1), ["a photo of a cat"], ["ugly, blurry"], 20).at_step(0)
    assert torch.equal(step.cond, prompt_embeds)
    assert torch.equal(step.uncond, negative_embeds)
    assert step.pooled is None and step.uncond_pooled is None


def test_plain_prompt_equals_diffusers_sd2_with_its_own_pad_token(sd2):
    assert sd2.tokenizer.pad_token == "!" and sd2.tokenizer.pad_token_id == 0
    prompt_embeds, negative_embeds = sd2.encode_prompt("a photo of a cat", "cpu", 1, True, "")
    step = build_conditioning(PromptEncoder.from_pipeline(sd2), ["a photo of a cat"], [""], 20).at_step(0)
    assert torch.equal(step.cond, prompt_embeds)
    assert torch.equal(step.uncond, negative_embeds)


def test_plain_prompt_equals_diffusers_sdxl(sdxl):
    encoder = PromptEncoder.from_pipeline(sdxl)
    assert encoder.force_zeros_for_empty_prompt
    embeds, negative, pooled, negative_pooled = sdxl.encode_prompt("a photo of a cat", device="cpu")
    step = build_conditioning(encoder, ["a photo of a cat"], [""], 20).at_step(0)
    assert step.cond.shape == (1, TOKENS, 32 + 40) and step.pooled.shape == (1, 24)
    assert torch.equal(step.cond, embeds) and torch.equal(step.pooled, pooled)
    assert torch.equal(step.uncond, negative) and torch.equal(step.uncond_pooled, negative_pooled)
    assert not step.uncond.any() and not step.uncond_pooled.any()

    embeds, negative, pooled, negative_pooled = sdxl.encode_prompt("a cat", device="cpu", negative_prompt="bad")
    step = build_conditioning(encoder, ["a cat"], ["bad"], 20).at_step(0)
    assert torch.equal(step.cond, embeds) and torch.equal(step.pooled, pooled)
    assert torch.equal(step.uncond, negative) and torch.equal(step.uncond_pooled, negative_pooled)


def test_clip_skip_2_matches_diffusers_clip_skip_1(sd1, sdxl):
    # diffusers' SD 1.x path reads `text_encoder.text_model`, which transformers 5 no longer has, so
    # compare with the computation it performs: hidden_states[-2] through the final layer norm.
    encoder = PromptEncoder.from_pipeline(sd1)
    ids = sd1.tokenizer("a photo of a cat", padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = sd1.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = sd1.text_encoder.final_layer_norm(hidden)
    assert torch.equal(encoder.encode("a photo of a cat", clip_skip=2)[0], expected)
    assert not torch.equal(encoder.encode("a photo of a cat", clip_skip=1)[0], expected)

    embeds, _, pooled, _ = sdxl.encode_prompt("a photo of a cat", device="cpu", clip_skip=1)
    xl_embeds, xl_pooled = PromptEncoder.from_pipeline(sdxl).encode("a photo of a cat", clip_skip=2)
    assert torch.equal(xl_embeds, embeds) and torch.equal(xl_pooled, pooled)


def test_clip_skip_out_of_range_is_refused(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    for clip_skip in (0, 6):
        with pytest.raises(ValueError, match="clip_skip must be between 1 and 5"):
            encoder.encode("a cat", clip_skip=clip_skip)


# --------------------------------------------------------------------------- emphasis, chunks, BREAK


def test_weight_scales_the_token_and_keeps_the_mean(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    plain = encoder.encode("a cat photo")[0]
    for prompt, weight in (("a (cat:1.5) photo", 1.5), ("a [cat] photo", 1 / 1.1)):
        weighted = encoder.encode(prompt)[0]
        weights = torch.ones(1, TOKENS, 1)
        weights[0, 2] = weight  # BOS, "a", "cat"
        scale = plain.mean() / (plain * weights).mean()
        assert torch.allclose(weighted, plain * weights * scale, atol=1e-6)
        assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
        # The weighted token grew (or shrank) relative to its neighbours by exactly the weight.
        ratio = (weighted[0, 2] / plain[0, 2]).mean() / (weighted[0, 3] / plain[0, 3]).mean()
        assert ratio.item() == pytest.approx(weight, rel=1e-4)


def test_long_prompt_is_chunked_not_truncated(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    embeds, _ = encoder.encode(_words(200))
    assert embeds.shape == (1, 3 * TOKENS, 32)
    other, _ = encoder.encode(_words(200, last="house"))
    first, second, third = _chunks(embeds)
    assert torch.equal(first, _chunks(other)[0]) and torch.equal(second, _chunks(other)[1])
    assert not torch.equal(third, _chunks(other)[2])
    # Chunks are encoded independently: the third one is the last 50 words on their own.
    assert _same(third, encoder.encode(_words(50))[0])
    assert count_tokens(encoder, _words(200)) == (200, 225)


def test_break_starts_a_new_chunk(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    embeds, _ = encoder.encode("a red cat BREAK a blue dog")
    assert embeds.shape[1] == 2 * TOKENS
    first, second = _chunks(embeds)
    assert _same(first, encoder.encode("a red cat")[0])
    assert _same(second, encoder.encode("a blue dog")[0])
    assert count_tokens(encoder, "a red cat BREAK a blue dog") == (78, 150)
    assert encoder.encode("BREAK a cat")[0].shape[1] == 2 * TOKENS
    assert encoder.encode("a cat BREAK")[0].shape[1] == TOKENS


def test_chunk_boundary_moves_back_to_a_near_comma(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    near = _words(70) + ", " + _words(10, last="house")
    chunks = encoder.tokenize(near).chunks
    comma = sd1.tokenizer(",", add_special_tokens=False).input_ids[0]
    assert len(chunks) == 2 and len(chunks[0].tokens) == 71 and chunks[0].tokens[-1] == comma
    assert chunks[1].tokens == sd1.tokenizer(_words(10, last="house"), add_special_tokens=False).input_ids
    assert _same(_chunks(encoder.encode(near)[0])[1], encoder.encode(_words(10, last="house"))[0])
    assert count_tokens(encoder, near) == (85, 150)

    far = _words(50) + ", " + _words(30)  # the comma is 25 tokens before the boundary
    chunks = encoder.tokenize(far).chunks
    assert [len(chunk.tokens) for chunk in chunks] == [75, 6]


def test_empty_prompt_is_one_chunk(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    assert encoder.encode("")[0].shape == (1, TOKENS, 32)
    assert count_tokens(encoder, "") == (0, 75)
    assert count_tokens(sd1.tokenizer, "<lora:x:1>") == (0, 75)


def test_count_tokens(sd1):
    assert count_tokens(sd1.tokenizer, "a photo of a cat") == (5, 75)
    assert count_tokens(sd1.tokenizer, "<lora:film:0.5> a (photo:1.2), [cat]") == (4, 75)
    # The longest text of the schedule counts.
    assert count_tokens(sd1.tokenizer, "[dog dog dog:cat:5]") == (3, 75)
    assert count_tokens(sd1.tokenizer, _words(80)) == (80, 150)


def test_count_tokens_is_fast_enough_for_every_keystroke(sd1):
    prompt = ", ".join(f"(word{i}:1.1) [thing{i}] detail" for i in range(60))
    encoder = PromptEncoder.from_pipeline(sd1)
    tokens, limit = count_tokens(encoder, prompt)
    assert tokens > 300 and limit >= tokens
    start = time.perf_counter()
    for _ in range(10):
        count_tokens(encoder, prompt)
    assert (time.perf_counter() - start) / 10 < 0.05


# --------------------------------------------------------------------------- per-job conditioning


def test_negative_prompt_is_padded_with_empty_chunks(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    step = build_conditioning(encoder, [_words(200)], ["ugly"], 20).at_step(0)
    assert step.cond.shape == step.uncond.shape == (1, 3 * TOKENS, 32)
    first, second, third = _chunks(step.uncond)
    empty = encoder.encode("")[0]
    assert _same(first, encoder.encode("ugly")[0])
    assert _same(second, empty) and _same(third, empty)

    # A long negative pads the prompt the same way.
    step = build_conditioning(encoder, ["a cat"], [_words(100)], 20).at_step(0)
    assert step.cond.shape == step.uncond.shape == (1, 2 * TOKENS, 32)
    assert _same(_chunks(step.cond)[1], empty)


def test_sdxl_zero_negative_is_padded_with_the_empty_prompt(sdxl):
    encoder = PromptEncoder.from_pipeline(sdxl)
    step = build_conditioning(encoder, [_words(100)], [""], 20).at_step(0)
    first, second = _chunks(step.uncond)
    assert not first.any() and not step.uncond_pooled.any()
    assert _same(second, encoder.encode("")[0])


def test_prompt_editing_switches_at_the_right_step(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    cat, dog = encoder.encode("a cat")[0], encoder.encode("a dog")[0]
    conditioning = build_conditioning(encoder, ["a [cat:dog:5]"], [""], 10)
    assert conditioning.changes_at == {0, 5}
    for step in range(10):
        assert torch.equal(conditioning.at_step(step).cond, cat if step < 5 else dog)
    assert conditioning.at_step(4) is conditioning.at_step(0)
    assert conditioning.at_step(4).cond is conditioning.at_step(1).cond
    assert conditioning.at_step(12) is conditioning.at_step(9)
    with pytest.raises(ValueError):
        conditioning.at_step(-1)


@pytest.mark.parametrize(("prompt", "equals"), [("[a cat:a dog:0]", "a dog"), ("[a cat:a dog:1.0]", "a cat")])
def test_edit_at_zero_and_one(sd1, prompt, equals):
    encoder = PromptEncoder.from_pipeline(sd1)
    expected = encoder.encode(equals)[0]
    conditioning = build_conditioning(encoder, [prompt], [""], 10)
    assert conditioning.changes_at == {0}
    assert all(torch.equal(conditioning.at_step(step).cond, expected) for step in range(10))


def test_alternation_and_negative_editing(sdxl):
    encoder = PromptEncoder.from_pipeline(sdxl)
    cat, dog = encoder.encode("a cat"), encoder.encode("a dog")
    ugly, bad = encoder.encode("ugly"), encoder.encode("bad")
    conditioning = build_conditioning(encoder, ["a [cat|dog]"], ["[ugly:bad:3]"], 6)
    assert conditioning.changes_at == set(range(6))
    for step in range(6):
        current = conditioning.at_step(step)
        expected = cat if step % 2 == 0 else dog
        assert torch.equal(current.cond, expected[0]) and torch.equal(current.pooled, expected[1])
        negative = ugly if step < 3 else bad
        assert torch.equal(current.uncond, negative[0]) and torch.equal(current.uncond_pooled, negative[1])


def test_batch_encodes_each_distinct_text_once(sd1):
    encoder = PromptEncoder.from_pipeline(sd1)
    calls = []
    hook = sd1.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        conditioning = build_conditioning(encoder, ["a cat"] * 4, [""] * 4, 20)
    finally:
        hook.remove()
    assert len(calls) == 2  # "a cat" and the empty negative prompt
    step = conditioning.at_step(0)
    assert step.cond.shape == (4, TOKENS, 32)
    assert all(torch.equal(step.cond[index], step.cond[0]) for index in range(4))
    assert torch.equal(step.cond[:1], encoder.encode("a cat")[0])


def test_mismatched_batch_is_refused(sd1):
    with pytest.raises(ValueError, match="one negative prompt per prompt"):
        build_conditioning(PromptEncoder.from_pipeline(sd1), ["a", "b"], [""], 20)


# --------------------------------------------------------------------------- textual inversion


def test_textual_inversion_vectors_replace_the_name(sd1, embeddings_dir):
    database = EmbeddingDatabase(embeddings_dir)
    encoder = PromptEncoder.from_pipeline(sd1, embeddings=database)
    vectors = database.get("myemb").vectors["clip"]

    tokenized = encoder.tokenize("a myemb cat")
    assert [item.name for item in tokenized.embeddings_used] == ["myemb"]
    assert tokenized.chunks[0].fixes == [(1, database.get("myemb"))]
    assert count_tokens(encoder, "a myemb cat") == (4, 75)

    # Reference: the same model with two extra vocabulary rows holding the vectors.
    reference = copy.deepcopy(sd1.text_encoder)
    reference.resize_token_embeddings(49410)
    reference.get_input_embeddings().weight.data[49408:] = vectors
    a, cat = sd1.tokenizer("a cat", add_special_tokens=False).input_ids
    ids = [49406, a, 49408, 49409, cat, 49407] + [49407] * (TOKENS - 6)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).last_hidden_state
    assert torch.allclose(encoder.encode("a myemb cat")[0], expected, atol=1e-6)

    conditioning = build_conditioning(encoder, ["a (myemb:1.2) cat"], [""], 20)
    assert conditioning.ti_hashes == f"myemb: {sha256_short(embeddings_dir / 'myemb.safetensors')}"
    assert build_conditioning(encoder, ["a cat"], [""], 20).ti_hashes is None


def test_sdxl_embedding_fills_both_encoders(sdxl, embeddings_dir):
    database = EmbeddingDatabase(embeddings_dir)
    encoder = PromptEncoder.from_pipeline(sdxl, embeddings=database)
    plain = PromptEncoder.from_pipeline(sdxl)
    loaded, skipped = encoder.embedding_status()
    assert [item.name for item in loaded] == ["xlemb"] and [item.name for item in skipped] == ["myemb"]
    tokenized = encoder.tokenize("a xlemb cat, myemb")
    # The SD 1.x embedding does not fit SDXL: its name stays plain text.
    assert [item.name for item in tokenized.embeddings_used] == ["xlemb"]
    assert len(tokenized.chunks[0].tokens) == len(plain.tokenize("a x y z cat, myemb").chunks[0].tokens)
    with_embedding = encoder.encode("a xlemb cat")[0]
    without = plain.encode("a xlemb cat")[0]
    assert with_embedding.shape == (1, TOKENS, 72)
    assert not torch.equal(with_embedding[..., :32], without[..., :32])
    assert not torch.equal(with_embedding[..., 32:], without[..., 32:])


def test_embedding_database_refresh_is_seen_by_the_encoder(sd1, tmp_path):
    database = EmbeddingDatabase(tmp_path)
    encoder = PromptEncoder.from_pipeline(sd1, embeddings=database)
    assert encoder.tokenize("newemb").embeddings_used == []
    save_file({"emb_params": torch.ones(1, 32)}, tmp_path / "newemb.safetensors")
    database.refresh()
    assert [item.name for item in encoder.tokenize("newemb").embeddings_used] == ["newemb"]


def test_embedding_vectors_are_not_split_across_chunks(sd1, embeddings_dir):
    encoder = PromptEncoder.from_pipeline(sd1, embeddings=EmbeddingDatabase(embeddings_dir))
    chunks = encoder.tokenize(_words(74) + " myemb").chunks
    assert [len(chunk.tokens) for chunk in chunks] == [74, 2]
    assert chunks[1].fixes[0][0] == 0
    assert CHUNK_LENGTH == 75
