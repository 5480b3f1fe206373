"""The shipped T5 tokenizer (google/t5-v1_1-xxl's): loads offline, is used when the user has none, and is refused
by name for a T5 text encoder whose embedding is smaller than its vocabulary."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from transformers import T5EncoderModel, T5TokenizerFast

from pipelines.models.families import flux
from tests.fixtures.tiny_flux import (
    _as,
    _seeded,
    clip_to_file,
    tiny_flux_components,
    tiny_t5_tokenizer,
    transformer_to_original,
)
from tests.fixtures.tiny_models import vae_to_original

SHIPPED = flux.CONFIG_DIR / flux.T5_TOKENIZER_DIR
#: Rows of the real T5-XXL embedding: T5's 32100 tokens padded to a multiple of 128.
T5_XXL_ROWS = 32128


def test_shipped_tokenizer_is_t5s_and_loads_offline():
    tokenizer = T5TokenizerFast.from_pretrained(SHIPPED, local_files_only=True)
    assert len(tokenizer) == 32100  # 32000 sentencepiece pieces + 100 <extra_id_*>
    assert tokenizer("Hello world").input_ids == [8774, 296, 1]
    assert tokenizer("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.model_max_length) == (0, 1, 512)
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 32099


def _t5_file(folder, rows: int):
    """A tiny T5 text encoder file (the fixture's width) whose embedding has ``rows`` rows."""
    config = tiny_flux_components(True)["text_encoder_2"].config
    config.vocab_size = rows
    weights = _seeded(24, lambda: T5EncoderModel(config)).state_dict()
    weights.pop("encoder.embed_tokens.weight")  # stored once, as shared
    path = folder / f"t5-{rows}.safetensors"
    safetensors.torch.save_file(_as(weights, torch.float32), str(path))
    return path


@pytest.fixture(scope="module")
def split_flux(tmp_path_factory):
    """A schnell transformer file and its CLIP-L / VAE files, with a text encoder folder holding no tokenizer."""
    root = tmp_path_factory.mktemp("flux-shipped-tokenizer")
    models = tiny_flux_components(False)
    files = {"transformer": root / "transformer.safetensors", "clip_l": root / "clip_l.safetensors",
             "vae": root / "ae.safetensors"}
    safetensors.torch.save_file(_as(transformer_to_original(models["transformer"]), torch.float32),
                                str(files["transformer"]))
    safetensors.torch.save_file(_as(clip_to_file(models["text_encoder"]), torch.float32), str(files["clip_l"]))
    safetensors.torch.save_file(_as(vae_to_original(models["vae"], prefix=""), torch.float32), str(files["vae"]))
    (root / "text_encoder").mkdir()
    return root, files


def _load(split_flux, t5_file):
    root, files = split_flux
    return flux.load(files["transformer"], torch_dtype=torch.float32, cache_dir=root / "cache",
                     modules=[files["clip_l"], t5_file, files["vae"]], search={"text_encoder": [root / "text_encoder"]})


def test_split_load_without_user_tokenizer_uses_the_shipped_one(split_flux):
    pipe, _ = _load(split_flux, _t5_file(split_flux[0], T5_XXL_ROWS))
    assert len(pipe.tokenizer_2) == 32100 and pipe.tokenizer_2("Hello world").input_ids == [8774, 296, 1]
    embeds, pooled, _ = pipe.encode_prompt("Hello world", prompt_2=None, max_sequence_length=16)
    assert embeds.shape == (1, 16, 32) and torch.isfinite(embeds).all()


def test_user_tokenizer_folder_wins_over_the_shipped_one(split_flux, tmp_path):
    root, files = split_flux
    tiny_t5_tokenizer().save_pretrained(tmp_path / flux.T5_TOKENIZER_DIR)
    pipe, _ = flux.load(files["transformer"], torch_dtype=torch.float32, cache_dir=root / "cache",
                        modules=[files["clip_l"], _t5_file(root, T5_XXL_ROWS), files["vae"]],
                        search={"text_encoder": [tmp_path]})
    assert len(pipe.tokenizer_2) == len(tiny_t5_tokenizer())


def test_tokenizer_larger_than_the_embedding_is_refused_naming_file_and_folder(split_flux):
    root, _ = split_flux
    small = _t5_file(root, 200)
    with pytest.raises(ValueError) as error:
        _load(split_flux, small)
    message = str(error.value)
    assert str(small) in message and str(SHIPPED) in message and "32100 tokens" in message and "200 rows" in message
    assert str(root / "text_encoder" / flux.T5_TOKENIZER_DIR) in message
