"""What a typed A1111 client sends and reads: every field at A1111 1.10's default, answers checked against
pydantic models written from A1111's own response models (sd-models, samplers, schedulers, options,
txt2img / img2img answers)."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from pydantic import BaseModel, ConfigDict, TypeAdapter

from tests.fixtures.api_helpers import ApiServer, b64_png, decode_png
from tests.fixtures.pictures import picture

TIMEOUT = 300

#: The body a client generated from A1111 1.10's schema sends for txt2img when the user sets only the prompt:
#: every field present, at A1111's default (None where A1111's default is None), the schedule as "normal".
A1111_TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "a photo of a cat", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None,
    "scheduler": "normal", "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512,
    "height": 512, "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "eta": None, "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None,
    "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": None, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}

#: img2img's own fields at their A1111 defaults (the init image is the one field a client must fill).
A1111_IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{key: value for key, value in A1111_TXT2IMG_DEFAULTS.items()
       if not key.startswith(("hr_", "enable_hr", "firstphase", "firstpass"))},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "latent_mask": None, "include_init_images": False, "denoising_strength": 0.75,
}


# --- A1111's response models ------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SDModelItem(Strict):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SamplerItem(Strict):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(Strict):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class GenerationAnswer(Strict):
    images: list[str] | None
    parameters: dict
    info: str


class Options(BaseModel):  # A1111's options model lists many more keys; these are the ones scripts use most
    samples_save: bool
    samples_format: str
    samples_filename_pattern: str
    grid_save: bool
    grid_format: str
    outdir_samples: str
    outdir_txt2img_samples: str
    outdir_img2img_samples: str
    outdir_extras_samples: str
    outdir_grids: str
    outdir_txt2img_grids: str
    outdir_img2img_grids: str
    jpeg_quality: int
    webp_lossless: bool
    enable_pnginfo: bool
    eta_noise_seed_delta: int
    return_grid: bool
    save_images_before_highres_fix: bool
    sd_model_checkpoint: str
    sd_vae: str
    CLIP_stop_at_last_layers: int
    show_progress_every_n_steps: int


@pytest.fixture(scope="module")
def server(engine_factory, tmp_path_factory):
    engine = engine_factory(checkpoint_cache=2)
    site = ApiServer(engine, engine.paths.data_dir).start()
    yield site
    site.stop()


def _get(server: ApiServer, path: str) -> Any:
    answer = requests.get(server.url + path, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_lists_validate_against_a1111_models(server):
    models = TypeAdapter(list[SDModelItem]).validate_python(_get(server, "/sdapi/v1/sd-models"))
    assert any(model.model_name == "tiny-sd15" for model in models)
    samplers = TypeAdapter(list[SamplerItem]).validate_python(_get(server, "/sdapi/v1/samplers"))
    assert {"Euler", "Euler a", "DPM++ 2M"} <= {sampler.name for sampler in samplers}
    schedulers = TypeAdapter(list[SchedulerItem]).validate_python(_get(server, "/sdapi/v1/schedulers"))
    assert {"automatic", "karras", "normal", "beta"} <= {item.name for item in schedulers}
    options = Options.model_validate(_get(server, "/sdapi/v1/options"))
    assert options.samples_format == "png"


def test_the_default_body_of_a_typed_client_runs_on_txt2img_and_img2img(server):
    answer = requests.post(server.url + "/sdapi/v1/txt2img", json=A1111_TXT2IMG_DEFAULTS, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    result = GenerationAnswer.model_validate(answer.json())
    assert result.images and decode_png(result.images[0]).size == (512, 512)
    assert "Schedule type: Normal" in result.info, result.info

    body = {**A1111_IMG2IMG_DEFAULTS, "init_images": [b64_png(picture())], "width": 64, "height": 64}
    answer = requests.post(server.url + "/sdapi/v1/img2img", json=body, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    result = GenerationAnswer.model_validate(answer.json())
    assert result.images and decode_png(result.images[0]).size == (64, 64)
