"""The prompt language through the whole engine: editing, emphasis, long prompts, embeddings, styles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.images.infotext import parse_infotext
from pipelines.prompts.styles import Style
from tests.helpers import pixels, txt2img


def _same(a, b) -> bool:
    return np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def _embeddings_per_step(engine, monkeypatch, request) -> list[torch.Tensor]:
    """The text conditioning the UNet gets at each step (the conditional half of the CFG batch)."""
    unet = engine.models.get(request.checkpoint).unet
    seen: list[torch.Tensor] = []
    original = unet.forward

    def spy(sample, timestep, *args, encoder_hidden_states=None, **kwargs):
        seen.append(encoder_hidden_states[-1].clone())
        return original(sample, timestep, *args, encoder_hidden_states=encoder_hidden_states, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    engine.generate(request)
    monkeypatch.undo()
    return seen


def test_prompt_editing_switches_at_the_given_step(engine, monkeypatch):
    steps = _embeddings_per_step(engine, monkeypatch, txt2img(prompt="[a cat:a dog:2]", steps=4))
    cat = _embeddings_per_step(engine, monkeypatch, txt2img(prompt="a cat", steps=1))[0]
    dog = _embeddings_per_step(engine, monkeypatch, txt2img(prompt="a dog", steps=1))[0]
    assert [torch.equal(e, cat) for e in steps] == [True, True, False, False]
    assert [torch.equal(e, dog) for e in steps] == [False, False, True, True]


def test_alternation_changes_every_step(engine, monkeypatch):
    steps = _embeddings_per_step(engine, monkeypatch, txt2img(prompt="a [cat|dog]", steps=4))
    assert not torch.equal(steps[0], steps[1]) and torch.equal(steps[0], steps[2])


@pytest.mark.parametrize("edit, plain", [("[a cat:a dog:0]", "a dog"), ("[a cat:a dog:1.0]", "a cat")])
def test_edit_at_the_ends_equals_the_plain_prompt(engine, edit, plain):
    assert _same(engine.generate(txt2img(prompt=edit)), engine.generate(txt2img(prompt=plain)))


def test_emphasis_changes_the_image(engine):
    plain = engine.generate(txt2img(prompt="a cat, red sky"))
    assert not _same(plain, engine.generate(txt2img(prompt="a (cat:1.6), red sky")))
    assert _same(plain, engine.generate(txt2img(prompt="a (cat:1.0), red sky")))


def test_long_prompts_are_not_truncated(engine, monkeypatch):
    words = ", ".join(f"word{i}" for i in range(50))  # about 200 tokens: three chunks
    a = _embeddings_per_step(engine, monkeypatch, txt2img(prompt=words + ", a red balloon", steps=1))[0]
    b = _embeddings_per_step(engine, monkeypatch, txt2img(prompt=words + ", a blue house", steps=1))[0]
    chunks = a.shape[0] // 77  # 75 tokens + BOS/EOS each
    assert a.shape == b.shape and chunks * 77 == a.shape[0] and chunks >= 3
    # Only the last chunk holds the last words: the chunks before it are equal, the last is not.
    last = (chunks - 1) * 77
    assert torch.equal(a[:last], b[:last])
    assert (a[last:] - b[last:]).abs().max() > 1e-3, "the words after the first chunks must reach the model"
    red = engine.generate(txt2img(prompt=words + ", a red balloon"))
    blue = engine.generate(txt2img(prompt=words + ", a blue house"))
    assert not _same(red, blue)


def test_textual_inversion_from_the_embeddings_folder(engine_factory):
    engine = engine_factory()
    engine.paths.embeddings_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, 32) * 3}, engine.paths.embeddings_dir / "shiny-style.safetensors")
    plain = engine.generate(txt2img(prompt="a cat, shiny-style"))  # the same words, but the file is a TI now
    assert "TI hashes" in parse_infotext(plain.infotexts[0])
    assert parse_infotext(plain.infotexts[0])["TI hashes"].startswith("shiny-style: ")
    without = engine.generate(txt2img(prompt="a cat, plain-style"))
    assert not _same(plain, without)
    assert "TI hashes" not in parse_infotext(without.infotexts[0])


def test_styles_are_applied_and_recorded(engine_factory):
    engine = engine_factory()
    engine.styles.save(Style("film", "{prompt}, analog film, grain", "digital"))
    result = engine.generate(txt2img(prompt="a cat", negative_prompt="blurry", styles=["film"]))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed["Prompt"] == "a cat, analog film, grain"
    assert parsed["Negative prompt"] == "blurry, digital"
    direct = engine.generate(txt2img(prompt="a cat, analog film, grain", negative_prompt="blurry, digital"))
    assert _same(result, direct)


def test_prompts_are_encoded_once_per_job(engine, monkeypatch):
    encoder = engine.models.get("tiny-sd15.safetensors").pipe.text_encoder
    calls = []
    original = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    engine.generate(txt2img(batch_size=1, n_iter=1))
    one = len(calls)
    calls.clear()
    engine.generate(txt2img(batch_size=3, n_iter=3))
    assert len(calls) == one, "nine images of the same prompt need no more encoder calls than one"


class _RecordingNetwork:
    """An extra-network handler that scales the UNet's output conv for one job, and records its calls."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []
        self.saved = None

    def activate(self, model, tags):
        self.calls.append(("activate", tuple(tag.args for tag in tags)))
        weight = float(tags[0].args[1])
        self.saved = model.unet.conv_out.weight.detach().clone()
        model.unet.conv_out.weight.data.mul_(1 + weight)
        return {"Test nets": ", ".join(tag.args[0] for tag in tags)}

    def deactivate(self, model):
        self.calls.append(("deactivate", ()))
        model.unet.conv_out.weight.data.copy_(self.saved)


def test_extra_network_tags_go_to_their_handler_for_one_job(engine_factory):
    engine = engine_factory()
    handler = _RecordingNetwork()
    engine.extra_networks.register("testnet", handler)
    plain = engine.generate(txt2img(prompt="a cat"))
    tagged = engine.generate(txt2img(prompt="a cat <testnet:foo:0.5>"))
    assert handler.calls == [("activate", (("foo", "0.5"),)), ("deactivate", ())]
    assert not _same(plain, tagged)
    assert parse_infotext(tagged.infotexts[0])["Test nets"] == "foo"
    assert tagged.warnings == []
    assert _same(plain, engine.generate(txt2img(prompt="a cat"))), "nothing may leak into the next job"


def test_extra_network_is_undone_after_a_failed_or_interrupted_job(engine_factory, monkeypatch):
    from pipelines.job_control import JobControl

    engine = engine_factory()
    handler = _RecordingNetwork()
    engine.extra_networks.register("testnet", handler)
    plain = engine.generate(txt2img(prompt="a cat"))
    control = JobControl(on_progress=lambda p: p.sampling_step == 2 and control.interrupt())
    result = engine.generate(txt2img(prompt="a cat <testnet:x:1>"), control=control)
    assert result.interrupted and handler.calls[-1] == ("deactivate", ())
    unet = engine.models.get("tiny-sd15.safetensors").unet
    monkeypatch.setattr(unet, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        engine.generate(txt2img(prompt="a cat <testnet:x:1>"))
    monkeypatch.undo()
    assert handler.calls[-1] == ("deactivate", ())
    assert _same(plain, engine.generate(txt2img(prompt="a cat")))


def test_built_in_extra_networks_cannot_be_replaced(engine_factory):
    engine = engine_factory()
    engine.extra_networks.register("lora", _RecordingNetwork(), builtin=True)
    with pytest.raises(ValueError, match="built in"):
        engine.extra_networks.register("lora", _RecordingNetwork())
