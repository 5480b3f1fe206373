"""Engine.plan (a request resolved once, one error type naming the field) and what a result carries as data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.images.infotext import parse_infotext, request_fields_from_infotext
from pipelines.images.saving import decode_base64_image
from pipelines.plan import JobPlan, RequestError
from pipelines.plugins.scripts import ScriptError, SelectableScript
from pipelines.processing import GenerationResult
from pipelines.request import Img2ImgRequest
from tests.fixtures.pictures import half_mask, picture
from tests.helpers import SD15, txt2img
from webui.api.translate import PreparedJob, build_response


class _Picky(SelectableScript):
    title = "Picky"

    def parse_args(self, args):
        if args != ["ok"]:
            raise ValueError(f"want ['ok'], got {args!r}")
        return args


@pytest.fixture(scope="module")
def planner(engine_factory):
    engine = engine_factory()
    engine.selectable_scripts.register(_Picky())
    return engine


@pytest.mark.parametrize("update, field, words", [
    ({"checkpoint": "nope"}, "checkpoint", "no model matches 'nope'; available: tiny-sd15"),
    ({"checkpoint": "nope [0123456789]"}, "checkpoint", "no model matches 'nope [0123456789]'"),
    ({"vae": "nope.pt"}, "vae", "no VAE matches 'nope.pt'; choose one of Automatic"),
    ({"enable_hr": True, "hr_upscaler": "Magic"}, "hr_upscaler", "no upscaler named 'Magic'; available: None"),
    ({"enable_hr": True, "hr_checkpoint_name": "nope"}, "hr_checkpoint_name", "no model matches 'nope'; available"),
    ({"styles": ["no-such-style"]}, "styles", "unknown style(s) 'no-such-style'"),
    ({"alwayson_scripts": {"nope": []}}, "alwayson_scripts", "no always-on script called 'nope'"),
    ({"script_name": "nope"}, "script_name", "no script called 'nope'; available: Picky"),
    ({"script_name": "Picky", "script_args": ["bad"]}, "script_args", "want ['ok']"),
])
def test_plan_errors_name_the_field_and_what_is_available(planner, update, field, words):
    with pytest.raises(RequestError) as raised:
        planner.plan(txt2img(**update))
    error = raised.value
    assert error.field == field
    assert str(error).startswith(f"{field}") and words in str(error), str(error)
    assert isinstance(error, LookupError)  # what the engine's lookups always raised
    if field.startswith(("alwayson", "script")):
        assert isinstance(error, ScriptError)  # and what scripts raise
    assert planner.models.current is None  # nothing was loaded


def test_plan_resolves_every_name_once(planner):
    title = planner.registry.find_checkpoint(SD15).title
    plan = planner.plan(txt2img(checkpoint=title.split(" [")[1].rstrip("]"), vae="tiny-vae", enable_hr=True,
                                hr_upscaler="Lanczos", hr_checkpoint_name=SD15, script_name="picky",
                                script_args=["ok"]))
    assert isinstance(plan, JobPlan)
    assert plan.checkpoint.title == title  # a hash resolves as before
    assert plan.vae is not None and plan.vae_name == plan.vae.name
    assert plan.hires_checkpoint.title == title and plan.hires_upscaler.name == "Lanczos"
    assert plan.script[0].title == "Picky" and plan.script[1] == ["ok"]
    assert plan.scripts == () and plan.styles == ()
    with pytest.raises(AttributeError):
        plan.vae = None  # frozen


def test_result_carries_its_extra_params_and_grid(engine_factory):
    engine = engine_factory()
    result = engine.generate(Img2ImgRequest(init_images=[picture()], mask=half_mask(), batch_size=2, steps=2,
                                            width=64, height=64, checkpoint=SD15, sampler_name="Euler",
                                            save_images=True))
    assert result.extra_params is not None and result.extra_params["Mask blur"] == 4
    # The job's parameters as data are what every infotext holds beyond the request's fields.
    for infotext in result.infotexts:
        extra = request_fields_from_infotext(parse_infotext(infotext))["extra"]
        extra.pop("Version")
        assert extra == {k: v for k, v in result.extra_params.items() if v is not None}
    # The grid as an image is the grid saved to disk.
    assert result.grid is not None and result.grid_path is not None
    with Image.open(result.grid_path) as saved:
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(result.grid.convert("RGB")))


def test_the_api_answer_needs_neither_the_grid_file_nor_the_infotext_text():
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    grid = Image.new("RGB", (16, 8), "green")
    request = txt2img(batch_size=2)
    result = GenerationResult(request=request, images=images, infotexts=["a, Steps: 4", "b, Steps: 4"],
                              seeds=[1, 2], subseeds=[3, 4], prompts=["a", "b"], negative_prompts=["", ""],
                              grid=grid, grid_path=Path("/nonexistent/grid.png"),
                              extra_params={"Mask blur": 4, "Inpaint area": None})
    job = PreparedJob(request=request, option_changes={}, parameters={})
    answer = build_response(job, result, None)
    info = json.loads(answer["info"])
    assert info["index_of_first_image"] == 1 and len(answer["images"]) == 3
    assert decode_base64_image(answer["images"][0]).size == grid.size
    assert info["extra_generation_params"] == {"Mask blur": 4}  # from the data, not parsed from the text
