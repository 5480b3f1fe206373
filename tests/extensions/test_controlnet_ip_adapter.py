"""IP-Adapter as a ControlNet unit (module ip-adapter_clip_sd15, model ip-adapter_sd15) on the tiny SD 1.5 model
with a tiny CLIP vision encoder: it changes the image, weight and start/end act, the UNet is left as it was,
and the image equals diffusers' own IP-Adapter pipeline on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from extensions.controlnet.ip_adapter import image_processor
from pipelines.images.infotext import parse_infotext
from pipelines.sampling.samplers import build_scheduler
from tests.fixtures.api_helpers import b64_png
from tests.fixtures.pictures import picture
from tests.fixtures.tiny_controlnets import write_tiny_controlnets
from tests.fixtures.tiny_ip_adapter import write_clip_vision, write_ip_adapter
from tests.helpers import pixels, txt2img


@pytest.fixture(scope="module")
def ip_engine(tiny_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from webui.extensions import load_extensions

    extra = tmp_path_factory.mktemp("controlnet-ip")
    write_ip_adapter(extra)
    write_tiny_controlnets(extra)
    clip = tmp_path_factory.mktemp("clip_vision")
    write_clip_vision(clip / "clip_h")
    data = tmp_path_factory.mktemp("data")
    paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs",
                  extra_dirs={"controlnet": (extra,), "clip_vision": (clip,)})
    engine = Engine(EngineSettings(paths=paths, device="cpu", checkpoint_cache=2))
    engine.loaded_extensions = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("plugins"))
    engine.test_dirs = (extra, clip)
    return engine


def ip_unit(**kw) -> dict:
    return {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_sd15", "image": b64_png(picture()), **kw}


def run(engine, units=None, **kw):
    result = engine.generate(txt2img(alwayson_scripts={"controlnet": units} if units else {}, **kw))
    return pixels(result.images[0]), result


def test_ip_adapter_changes_the_image_and_leaves_the_unet_alone(ip_engine):
    plain, _ = run(ip_engine)
    unet = ip_engine.models.get("tiny-sd15.safetensors").unet
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    prompted, result = run(ip_engine, [ip_unit()])
    assert np.abs(prompted - plain).mean() > 0.5
    assert result.extra_images == []  # an image prompt has no map
    assert parse_infotext(result.infotexts[0])["ControlNet 0"].startswith(
        "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15 [")
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    assert unet.encoder_hid_proj is None and run(ip_engine)[0].tolist() == plain.tolist()
    assert run(ip_engine, [ip_unit(weight=0.0)])[0].tolist() == plain.tolist()
    assert run(ip_engine, [ip_unit(guidance_end=0.0)])[0].tolist() == plain.tolist()
    late, _ = run(ip_engine, [ip_unit(guidance_start=0.5)])
    assert 0 < np.abs(late - plain).mean() and not np.array_equal(late, prompted)


def test_ip_adapter_equals_diffusers_ip_adapter_pipeline(ip_engine):
    request = txt2img(alwayson_scripts={"controlnet": [ip_unit(weight=0.8)]}, sampler_name="Euler", seed=7,
                      steps=4, width=64, height=64)
    ours = ip_engine.generate(request).images[0]
    model = ip_engine.models.get(request.checkpoint)
    extra, clip = ip_engine.test_dirs
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(clip / "clip_h")
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "image_encoder": encoder,
                                      "feature_extractor": image_processor(encoder)})
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("Euler", "Automatic", model.scheduler_config)
    pipe.load_ip_adapter(str(extra), subfolder="", weight_name="ip-adapter_sd15.safetensors")
    try:
        pipe.set_ip_adapter_scale(0.8)
        theirs = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, ip_adapter_image=picture(),
                      num_inference_steps=4, guidance_scale=request.cfg_scale, width=64, height=64,
                      generator=torch.Generator("cpu").manual_seed(7)).images[0]
    finally:
        pipe.unload_ip_adapter()
    assert int(np.abs(pixels(ours) - pixels(theirs)).max()) <= 1


def test_ip_adapter_pairing_and_missing_encoder_messages(ip_engine, tmp_path):
    parse = ip_engine.scripts.parse
    with pytest.raises(Exception, match="the IP-Adapter model ip-adapter_sd15 .* needs an IP-Adapter module"):
        parse({"controlnet": [ip_unit(module="canny")]})
    with pytest.raises(Exception, match="encodes an image prompt for an IP-Adapter model"):
        parse({"controlnet": [ip_unit(model="tiny-controlnet-sd15")]})
    with pytest.raises(Exception, match="'ip-adapter_clip_sdxl' is unavailable: needs a CLIP vision encoder in "
                                        ".*clip_g: config.json, model.safetensors"):
        parse({"controlnet": [ip_unit(module="ip-adapter_clip_sdxl")]})
    with pytest.raises(ValueError, match="is an IP-Adapter for a UNet with 32-wide text embeddings; the checkpoint"):
        run(ip_engine, [ip_unit()], checkpoint="tiny-sdxl.safetensors")
