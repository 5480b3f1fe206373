"""Infotext writing and reading (docs/compatibility.md §1) and the request-field table."""

from __future__ import annotations

import pytest

from pipelines.images.infotext import (
    SCHEDULE_LABELS,
    build_infotext,
    infotext_params_from_fields,
    parse_infotext,
    request_fields_from_infotext,
)

A1111_EXAMPLE = (
    "a photo of a cat\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3056755576, Size: 512x512, "
    "Model hash: 540e663c24, Model: epicrealism, Version: v0.1"
)


def test_build_matches_reference_layout_whatever_the_insertion_order():
    params = {
        "Version": "v0.1",
        "Model": "epicrealism",
        "Size": "512x512",
        "Seed": 3056755576,
        "CFG scale": 7.0,
        "Model hash": "540e663c24",
        "Schedule type": "Automatic",
        "Sampler": "Euler a",
        "Steps": 20,
    }
    assert build_infotext("a photo of a cat", "blurry", params) == A1111_EXAMPLE


def test_build_orders_standard_keys_then_extras_in_insertion_order_then_version():
    params = {
        "Version": "v9",
        "Lora hashes": "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f",
        "Tiling": True,
        "Hires upscale": 2.0,
        "RNG": "CPU",
        "Clip skip": 2,
        "Denoising strength": 0.55,
        "Seed resize from": "256x256",
        "Variation seed strength": 0.3,
        "Variation seed": 11,
        "VAE": "vae-ft-mse",
        "VAE hash": "735e4c3a44",
        "Face restoration": "CodeFormer",
        "Seed": 1,
        "Steps": 30,
    }
    line = build_infotext("p", "", params).split("\n")[-1]
    assert line.startswith("Steps: 30, Seed: 1, Face restoration: CodeFormer, VAE hash: 735e4c3a44, VAE: vae-ft-mse, ")
    assert line.endswith(
        "Variation seed: 11, Variation seed strength: 0.3, Seed resize from: 256x256, Denoising strength: 0.55, "
        'Clip skip: 2, RNG: CPU, Tiling: True, Lora hashes: "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f", '
        "Hires upscale: 2, Version: v9"
    )


def test_build_drops_none_and_clip_skip_of_one_and_omits_empty_negative():
    text = build_infotext("\n  cat", "", {"Steps": 4, "Sampler": "Euler", "Seed": 1, "Clip skip": 1, "VAE": None})
    assert text == "cat\nSteps: 4, Sampler: Euler, Seed: 1"
    assert "Negative prompt" not in text


def test_build_quotes_values_with_separators_as_json():
    text = build_infotext("p", "", {
        "Steps": 1, "Sampler": "Euler", "Seed": 1,
        "ControlNet 0": "Module: canny, Model: cn [abcd1234]",
        "Note": "line one\nline two",
        "Title": "café: naïve",
        "Quoted": '"already quoted"',
    })
    line = text.split("\n")[-1]
    assert 'ControlNet 0: "Module: canny, Model: cn [abcd1234]"' in line
    assert 'Note: "line one\\nline two"' in line
    assert 'Title: "café: naïve"' in line  # ensure_ascii=False keeps the accents readable
    assert 'Quoted: "\\"already quoted\\""' in line


def test_build_rejects_keys_that_cannot_be_read_back():
    with pytest.raises(ValueError, match="Bad: key"):
        build_infotext("p", "", {"Steps": 1, "Bad: key": 1})


def test_parse_reference_example():
    parsed = parse_infotext(A1111_EXAMPLE)
    assert parsed == {
        "Prompt": "a photo of a cat",
        "Negative prompt": "blurry",
        "Steps": 20,
        "Sampler": "Euler a",
        "Schedule type": "Automatic",
        "CFG scale": 7,
        "Seed": 3056755576,
        "Size": "512x512",
        "Size-1": 512,
        "Size-2": 512,
        "Model hash": "540e663c24",
        "Model": "epicrealism",
        "Version": "v0.1",
        "Clip skip": 1,
        "RNG": "GPU",
    }


def test_parse_multiline_prompts_quoted_values_and_numbers():
    text = (
        "masterpiece, 1girl\n(detailed:1.2) face\n"
        "Negative prompt: lowres\nbad hands, Negative prompt: twice\n"
        'Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: -1, Size: 768x512, '
        'Denoising strength: 0.45, Clip skip: 2, RNG: CPU, Hires upscale: 1.5, '
        'Lora hashes: "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f", Model hash: 0123456789, '
        'Escaped: "say \\"hi\\"", Version: 1.0'
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "masterpiece, 1girl\n(detailed:1.2) face"
    assert parsed["Negative prompt"] == "lowres\nbad hands, Negative prompt: twice"
    assert parsed["Steps"] == 25 and isinstance(parsed["Steps"], int)
    assert parsed["CFG scale"] == 6.5
    assert parsed["Seed"] == -1
    assert (parsed["Size-1"], parsed["Size-2"]) == (768, 512)
    assert parsed["Clip skip"] == 2 and parsed["RNG"] == "CPU" and parsed["Schedule type"] == "Karras"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54, film: 0a1b2c3d4e5f"
    assert parsed["Escaped"] == 'say "hi"'
    # Number-looking text stays text when converting would change it (a hash with a leading zero).
    assert parsed["Model hash"] == "0123456789"
    assert parsed["Version"] == 1.0


def test_parse_last_line_with_fewer_than_three_pairs_is_prompt():
    parsed = parse_infotext("a cat\nstyle: oil, mood: calm")
    assert parsed["Prompt"] == "a cat\nstyle: oil, mood: calm"
    assert "Steps" not in parsed
    assert parsed["Clip skip"] == 1 and parsed["Schedule type"] == "Automatic" and parsed["RNG"] == "GPU"


def test_parse_prompt_only_and_empty_prompt():
    assert parse_infotext("just a prompt")["Prompt"] == "just a prompt"
    parsed = parse_infotext("Steps: 5, Sampler: Euler, Seed: 3")
    assert parsed["Prompt"] == "" and parsed["Negative prompt"] == "" and parsed["Steps"] == 5


@pytest.mark.parametrize(
    ("written", "sampler", "schedule"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM++ 2M SGM Uniform", "DPM++ 2M", "SGM Uniform"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("Euler a", "Euler a", "Automatic"),
        ("Euler Uniform", "Euler", "Uniform"),
    ],
)
def test_parse_splits_old_style_sampler_names(written, sampler, schedule):
    parsed = parse_infotext(f"p\nSteps: 20, Sampler: {written}, CFG scale: 7, Seed: 1")
    assert (parsed["Sampler"], parsed["Schedule type"]) == (sampler, schedule)


def test_parse_keeps_sampler_name_when_schedule_type_is_given():
    parsed = parse_infotext("p\nSteps: 20, Sampler: DPM++ 2M Karras, Schedule type: Exponential, Seed: 1")
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M Karras", "Exponential")


def test_schedule_labels_match_the_sampler_table():
    from pipelines.sampling.samplers import SCHEDULE_NAMES

    assert set(SCHEDULE_LABELS) == set(SCHEDULE_NAMES)


def test_build_then_parse_round_trips_awkward_values():
    params = {
        "Steps": 20, "Sampler": "Euler", "Seed": 7,
        "Model": "my, model: v2", "Prompt note": '"quoted"', "Unicode": "日本語, テスト", "Spaces": " padded ",
    }
    parsed = parse_infotext(build_infotext("日本語の猫\n二行目", "ぼやけた", params))
    assert parsed["Prompt"] == "日本語の猫\n二行目"
    assert parsed["Negative prompt"] == "ぼやけた"
    for key, value in params.items():
        assert parsed[key] == value


# --- request fields <-> infotext ---------------------------------------------------------------

FULL_FIELDS = {
    "prompt": "a castle on a hill\nat dusk",
    "negative_prompt": "blurry, lowres",
    "steps": 28,
    "sampler_name": "DPM++ 2M",
    "scheduler": "Karras",
    "cfg_scale": 6.5,
    "seed": 1234567890,
    "subseed": 42,
    "subseed_strength": 0.25,
    "seed_resize_from_w": 640,
    "seed_resize_from_h": 448,
    "width": 512,
    "height": 768,
    "denoising_strength": 0.5,
    "clip_skip": 2,
    "tiling": True,
    "sd_model_name": "epicrealism",
    "sd_model_hash": "540e663c24",
    "sd_vae_name": "vae-ft-mse-840000",
    "sd_vae_hash": "735e4c3a44",
    "rng": "CPU",
    "enable_hr": True,
    "hr_scale": 2.0,
    "hr_second_pass_steps": 10,
    "hr_upscaler": "Latent",
    "extra": {"Lora hashes": "add_detail: 7c6bad76eb54", "ControlNet 0": "Module: canny, Weight: 1.0"},
}


def _round_trip(fields):
    params = infotext_params_from_fields(fields)
    text = build_infotext(str(fields.get("prompt", "")), str(fields.get("negative_prompt", "")), params)
    return request_fields_from_infotext(parse_infotext(text))


def test_fields_round_trip_through_infotext():
    back = _round_trip(FULL_FIELDS)
    assert back == FULL_FIELDS
    assert isinstance(back["cfg_scale"], float) and isinstance(back["hr_scale"], float)
    assert isinstance(back["steps"], int) and back["tiling"] is True


def test_minimal_fields_round_trip_with_implied_defaults():
    fields = {
        "prompt": "cat", "negative_prompt": "", "steps": 20, "sampler_name": "Euler a", "scheduler": "Automatic",
        "cfg_scale": 7.0, "seed": 5, "width": 512, "height": 512, "clip_skip": 1, "rng": "GPU",
        "subseed_strength": 0.0, "tiling": False, "enable_hr": False,
    }
    assert _round_trip(fields) == fields


def test_params_from_fields_writes_only_what_carries_information():
    params = infotext_params_from_fields({
        "steps": 20, "sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 7.0, "seed": 1,
        "width": 512, "height": 768, "subseed": 99, "subseed_strength": 0, "seed_resize_from_w": -1,
        "seed_resize_from_h": -1, "clip_skip": 1, "rng": "GPU", "tiling": False, "sd_vae_name": None,
        "sd_model_hash": "", "enable_hr": False, "hr_scale": 2.0, "hr_upscaler": "Latent",
        "batch_size": 4, "prompt": "ignored here",
    })
    assert params == {
        "Steps": 20, "Sampler": "Euler", "Schedule type": "Automatic", "CFG scale": 7.0, "Seed": 1,
        "Size": "512x768",
    }


def test_params_from_fields_hires_and_rng():
    params = infotext_params_from_fields({
        "steps": 20, "rng": "CPU", "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 0,
        "hr_upscaler": "R-ESRGAN 4x+", "hr_resize_x": 0, "hr_resize_y": 0,
    })
    assert params == {"Steps": 20, "RNG": "CPU", "Hires upscale": 1.5, "Hires upscaler": "R-ESRGAN 4x+"}


def test_optional_hires_keys_and_one_side_resize_map_both_ways():
    fields = {"steps": 20, "enable_hr": True, "hr_resize_x": 96, "hr_resize_y": 0, "hr_upscaler": "Latent",
              "hr_checkpoint_name": "other", "hr_sampler_name": "Euler a", "hr_scheduler": "Karras",
              "hr_prompt": "sharp, 4k", "hr_negative_prompt": "", "width": 64, "height": 64}
    params = infotext_params_from_fields(fields)
    assert params["Hires resize"] == "96x0" and "Hires negative prompt" not in params
    assert list(params)[-5:] == ["Hires upscaler", "Hires checkpoint", "Hires sampler", "Hires schedule type",
                                 "Hires prompt"]
    text = build_infotext("p", "", params)
    assert 'Hires checkpoint: other, Hires sampler: Euler a, Hires schedule type: Karras, Hires prompt: "sharp, 4k"' \
        in text
    back = request_fields_from_infotext(parse_infotext(text))
    assert "extra" not in back
    for name in ("hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt"):
        assert back[name] == fields[name], name
    assert not any(key.startswith("Hires") for key in infotext_params_from_fields({**fields, "enable_hr": False}))


def test_fields_from_infotext_types_extra_and_hires():
    parsed = parse_infotext(
        "p\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 640x384, Model: 1234, "
        "Hires upscaler: Latent, Hires resize: 1280x768, Face restoration: CodeFormer, Version: v1.10.1"
    )
    fields = request_fields_from_infotext(parsed)
    assert fields["cfg_scale"] == 7.0 and isinstance(fields["cfg_scale"], float)
    assert (fields["width"], fields["height"]) == (640, 384)
    assert fields["sd_model_name"] == "1234"  # a model name stays a string even when it looks numeric
    assert fields["enable_hr"] is True
    assert fields["hr_second_pass_steps"] == 0
    assert (fields["hr_resize_x"], fields["hr_resize_y"]) == (1280, 768)
    assert fields["subseed_strength"] == 0.0 and fields["tiling"] is False and fields["rng"] == "GPU"
    assert fields["extra"] == {"Face restoration": "CodeFormer", "Version": "v1.10.1"}


def test_fields_from_infotext_keeps_unknown_size_values_without_derived_keys():
    fields = request_fields_from_infotext(parse_infotext("p\nSteps: 3, Seed: 1, Sampler: Euler, Tile: 64x32"))
    assert fields["extra"] == {"Tile": "64x32"}
    assert "Tile: 64x32" in build_infotext("p", "", infotext_params_from_fields(fields))


def test_fields_from_infotext_names_the_bad_key():
    with pytest.raises(ValueError, match="'Steps'"):
        request_fields_from_infotext(parse_infotext("p\nSteps: many, Sampler: Euler, Seed: 1"))
    with pytest.raises(ValueError, match="'Tiling'"):
        request_fields_from_infotext(parse_infotext("p\nSteps: 2, Sampler: Euler, Seed: 1, Tiling: sometimes"))


def test_params_from_fields_refuses_extra_that_is_not_a_mapping():
    with pytest.raises(TypeError, match="extra: expected a mapping"):
        infotext_params_from_fields({"steps": 1, "extra": ["Lora hashes"]})


def test_parse_empty_prompt_with_negative_and_windows_line_ends():
    text = build_infotext("", "bad\nworse", {"Steps": 3, "Sampler": "Euler", "Seed": 2})
    assert text.startswith("Negative prompt: bad")
    parsed = parse_infotext(text.replace("\n", "\r\n"))
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Seed"]) == ("", "bad\nworse", 2)
