"""The Checkpoint Merger (pipelines/models/merge.py) on tiny SD 1.5 checkpoints: formulas key by key, float16,
metadata, baked VAE, copied config, refusals naming the field, the merged model generating, and memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.engine import Engine
from pipelines.models.merge import MergeSettings, merge_checkpoints
from pipelines.models.weights import read_safetensors_header
from pipelines.settings import EngineSettings, Paths
from tests.helpers import SD15, SD15_DIFFUSERS, txt2img

ROOT = Path(__file__).resolve().parents[2]


def _perturbed(source: Path, target: Path, seed: int) -> Path:
    """``source`` with seeded noise added to every float tensor (a differently trained model of the family)."""
    generator = torch.Generator().manual_seed(seed)
    state = load_file(str(source))
    noisy = {key: (value.float() + 0.05 * torch.randn(value.shape, generator=generator)).to(value.dtype)
             if value.is_floating_point() else value for key, value in state.items()}
    save_file(noisy, str(target), metadata={"ss_note": f"seed {seed}"})
    return target


@pytest.fixture(scope="module")
def models_dir(tiny_models, tmp_path_factory) -> Path:
    """A models/ folder of its own: A (tiny SD 1.5 + sidecar), B and C (perturbed), the tiny VAE, a diffusers folder."""
    root = tmp_path_factory.mktemp("merge-models")
    checkpoints = root / "Stable-diffusion"
    checkpoints.mkdir()
    shutil.copy(tiny_models / "Stable-diffusion" / SD15, checkpoints / "a.safetensors")
    shutil.copy((tiny_models / "Stable-diffusion" / SD15).with_suffix(".yaml"), checkpoints / "a.yaml")
    _perturbed(checkpoints / "a.safetensors", checkpoints / "b.safetensors", 1)
    _perturbed(checkpoints / "a.safetensors", checkpoints / "c.safetensors", 2)
    shutil.copytree(tiny_models / "Stable-diffusion" / SD15_DIFFUSERS, checkpoints / SD15_DIFFUSERS)
    shutil.copytree(tiny_models / "VAE", root / "VAE")
    return root


@pytest.fixture
def engine(models_dir, tmp_path) -> Engine:
    paths = Paths(data_dir=tmp_path / "data", models_dir=models_dir, outputs_dir=tmp_path / "data" / "outputs")
    return Engine(EngineSettings(paths=paths, device="cpu"))


def _merge(engine: Engine, name: str, **fields):
    result = merge_checkpoints(engine.registry, MergeSettings(custom_name=name, **fields))
    return result, load_file(str(result.path))


def _inputs(models_dir: Path) -> tuple[dict, dict, dict]:
    folder = models_dir / "Stable-diffusion"
    return tuple(load_file(str(folder / f"{x}.safetensors")) for x in "abc")


def test_weighted_sum_is_the_formula_key_by_key(engine, models_dir):
    a, b, _ = _inputs(models_dir)
    result, merged = _merge(engine, "ws", primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                            interp_method="Weighted sum", multiplier=0.3)
    assert set(merged) == set(a)
    merged_keys = 0
    for key, value in merged.items():
        assert value.dtype == a[key].dtype and value.shape == a[key].shape, key
        if "model" in key and a[key].is_floating_point() and "position_ids" not in key:
            expected = (a[key].float() * 0.7 + b[key].float() * 0.3).to(a[key].dtype)
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
            merged_keys += 1
        else:
            assert torch.equal(value, a[key]), key
    assert merged_keys > 100
    assert not torch.equal(merged["model.diffusion_model.out.2.weight"], a["model.diffusion_model.out.2.weight"])
    # The new model is in the list at once, under A1111's title.
    assert result.title in [m.title for m in engine.registry.checkpoints]
    assert result.path.parent == models_dir / "Stable-diffusion"
    assert not list(result.path.parent.glob(".merge-*")), "the temporary file is left behind"


def test_add_difference_is_the_formula_and_float16(engine, models_dir):
    a, b, c = _inputs(models_dir)
    # The tiny models are stored in float16; a float32 A shows that "Save as float16" converts.
    a32 = {key: value.float() if value.is_floating_point() else value for key, value in a.items()}
    save_file(a32, str(models_dir / "Stable-diffusion" / "a32.safetensors"))
    _, merged = _merge(engine, "ad", primary_model_name="a32.safetensors", secondary_model_name="b.safetensors",
                       tertiary_model_name="c.safetensors", interp_method="Add difference", multiplier=0.5,
                       save_as_half=True)
    for key, value in merged.items():
        if a32[key].is_floating_point():
            assert value.dtype == torch.float16, key
        if "model" in key and a32[key].is_floating_point() and "position_ids" not in key:
            expected = (a32[key] + (b[key].float() - c[key].float()) * 0.5).half()
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    _, plain = _merge(engine, "ad32", primary_model_name="a32.safetensors", secondary_model_name="b.safetensors",
                      tertiary_model_name="c.safetensors", interp_method="Add difference", multiplier=0.5)
    assert plain["model.diffusion_model.out.2.weight"].dtype == torch.float32


def test_metadata_recipe_and_models(engine, models_dir):
    result, _ = _merge(engine, "meta", primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                       multiplier=0.25)
    metadata, _ = read_safetensors_header(result.path)
    assert metadata["format"] == "pt"
    assert metadata["ss_note"] == "seed 1"  # copied from B ("Copy metadata from merged models")
    recipe = json.loads(metadata["sd_merge_recipe"])
    a = engine.registry.find_checkpoint("a.safetensors")
    b = engine.registry.find_checkpoint("b.safetensors")
    assert recipe["type"] == "webui" and recipe["interp_method"] == "Weighted sum"
    assert recipe["multiplier"] == 0.25 and recipe["primary_model_hash"] == a.sha256
    assert recipe["secondary_model_hash"] == b.sha256 and recipe["tertiary_model_hash"] is None
    models = json.loads(metadata["sd_merge_models"])
    assert models[a.sha256]["name"] == "a.safetensors" and models[b.sha256]["name"] == "b.safetensors"
    assert len(models[a.sha256]["legacy_hash"]) == 8
    # A merge of a merge carries the earlier recipe.
    again, _ = _merge(engine, "meta2", primary_model_name=result.path.name, secondary_model_name="c.safetensors")
    nested = json.loads(read_safetensors_header(again.path)[0]["sd_merge_models"])
    merged_sha = engine.registry.find_checkpoint(result.path.name).sha256
    assert nested[merged_sha]["sd_merge_recipe"]["multiplier"] == 0.25
    assert a.sha256 in nested  # the earlier sd_merge_models are kept
    bare, _ = _merge(engine, "bare", primary_model_name="a.safetensors", interp_method="No interpolation",
                     save_metadata=False)
    assert read_safetensors_header(bare.path)[0] == {}


def test_no_interpolation_bakes_the_vae_and_copies_the_config(engine, models_dir):
    a, _, _ = _inputs(models_dir)
    vae = load_file(str(models_dir / "VAE" / "tiny-vae.safetensors"))
    result, merged = _merge(engine, "baked", primary_model_name="a.safetensors", interp_method="No interpolation",
                            bake_in_vae="tiny-vae.safetensors")
    assert vae and all(torch.equal(merged["first_stage_model." + key], value) for key, value in vae.items())
    assert not torch.equal(merged["first_stage_model.decoder.conv_out.weight"],
                           a["first_stage_model.decoder.conv_out.weight"])
    others = [key for key in a if not key.startswith("first_stage_model.")]
    assert others and all(torch.equal(merged[key], a[key]) for key in others)
    assert result.config == result.path.with_suffix(".yaml")
    assert result.config.read_text() == (models_dir / "Stable-diffusion" / "a.yaml").read_text()
    none, _ = _merge(engine, "noconfig", primary_model_name="a.safetensors", interp_method="No interpolation",
                     config_source="Don't")
    assert none.config is None and not none.path.with_suffix(".yaml").exists()
    # B has no sidecar: "B" copies nothing.
    from_b, _ = _merge(engine, "fromb", primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                       config_source="B")
    assert from_b.config is None


def test_discard_weights(engine):
    _, merged = _merge(engine, "discard", primary_model_name="a.safetensors", interp_method="No interpolation",
                       discard_weights=r"^first_stage_model\.")
    assert merged and not any(key.startswith("first_stage_model.") for key in merged)


def test_the_merged_model_loads_and_generates(engine):
    result, _ = _merge(engine, "gen", primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
                       multiplier=0.5)
    merged = engine.generate(txt2img(checkpoint=result.title, steps=2))
    plain = engine.generate(txt2img(checkpoint="a.safetensors", steps=2))
    assert merged.images[0].size == (64, 64)
    assert merged.images[0].tobytes() != plain.images[0].tobytes()
    assert "gen" in merged.infotexts[0]


@pytest.mark.parametrize(("fields", "field"), [
    (dict(primary_model_name="a.safetensors", secondary_model_name=""), "secondary_model_name"),
    (dict(primary_model_name="a.safetensors", secondary_model_name="b.safetensors",
          interp_method="Add difference"), "tertiary_model_name"),
    (dict(primary_model_name="nope.safetensors", interp_method="No interpolation"), "primary_model_name"),
    (dict(primary_model_name=SD15_DIFFUSERS, interp_method="No interpolation"), "primary_model_name"),
    (dict(primary_model_name="a.safetensors", interp_method="No interpolation", bake_in_vae="nope"), "bake_in_vae"),
    (dict(primary_model_name="a.safetensors", interp_method="No interpolation", custom_name="a"), "custom_name"),
])
def test_refusals_name_the_field(engine, fields, field):
    with pytest.raises((ValueError, LookupError), match=field):
        merge_checkpoints(engine.registry, MergeSettings(**fields))


def test_diffusers_folders_are_refused_saying_so(engine):
    with pytest.raises(ValueError, match="diffusers folder"):
        merge_checkpoints(engine.registry, MergeSettings(primary_model_name=SD15_DIFFUSERS,
                                                         interp_method="No interpolation"))


@pytest.mark.parametrize("bad", ["../x", "sub/x", ".hidden"])
def test_custom_name_is_a_plain_file_name(bad):
    with pytest.raises(ValueError, match="custom_name"):
        MergeSettings(primary_model_name="a", custom_name=bad)


def test_other_family_is_refused(engine, tiny_models, models_dir):
    shutil.copy(tiny_models / "Stable-diffusion" / "tiny-sdxl.safetensors",
                models_dir / "Stable-diffusion" / "xl.safetensors")
    engine.registry.refresh()
    with pytest.raises(ValueError, match="secondary_model_name: .* same family"):
        merge_checkpoints(engine.registry, MergeSettings(primary_model_name="a.safetensors",
                                                         secondary_model_name="xl.safetensors", custom_name="x"))
    assert not (models_dir / "Stable-diffusion" / "x.safetensors").exists()


def test_interrupt_leaves_nothing(engine, models_dir):
    from pipelines.job_control import JobControl, JobInterrupted

    control = JobControl()
    control.interrupt()
    with pytest.raises(JobInterrupted):
        merge_checkpoints(engine.registry, MergeSettings(primary_model_name="a.safetensors",
                                                         secondary_model_name="b.safetensors", custom_name="int"),
                          control)
    folder = models_dir / "Stable-diffusion"
    assert not (folder / "int.safetensors").exists() and not list(folder.glob(".merge-*"))


_MEASURE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pipelines.models.catalog import ModelRegistry
    from pipelines.models.merge import MergeSettings, merge_checkpoints
    from pipelines.settings import Paths

    def peak():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    root = Path(sys.argv[1])
    registry = ModelRegistry(Paths(data_dir=root / "data", models_dir=root, outputs_dir=root / "out"))
    before = peak()
    merge_checkpoints(registry, MergeSettings(primary_model_name="big-a.safetensors",
                                              secondary_model_name="big-b.safetensors", custom_name="big-merged"))
    print(json.dumps({"before": before, "after": peak()}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
def test_merging_two_big_models_holds_far_less_than_one(tmp_path):
    """Two 192 MB float32 checkpoints merge while the process's peak RSS grows by far less than one model."""
    folder = tmp_path / "Stable-diffusion"
    folder.mkdir()
    keys = [f"model.diffusion_model.block{k}.weight" for k in range(48)]
    size = 0
    for name, seed in (("big-a", 1), ("big-b", 2)):
        generator = torch.Generator().manual_seed(seed)
        state = {key: torch.randn(1024, 1024, generator=generator) for key in keys}
        size = sum(t.numel() * t.element_size() for t in state.values())
        save_file(state, str(folder / f"{name}.safetensors"))
        del state
    answer = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=True)
    rss = json.loads(answer.stdout.strip().splitlines()[-1])
    growth = rss["after"] - rss["before"]
    assert growth < 0.25 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB merging two {size / 2**20:.0f} MiB models"
    merged = load_file(str(folder / "big-merged.safetensors"))
    a, b = (load_file(str(folder / f"big-{x}.safetensors"))[keys[3]] for x in "ab")
    assert torch.allclose(merged[keys[3]], a * 0.7 + b * 0.3)
