"""The built-in ControlNet extension on the tiny SD 1.5 model and tiny ControlNets (single file and folder)."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image, ImageDraw

from pipelines.images.infotext import parse_infotext
from pipelines.images.saving import read_infotext
from pipelines.plugins.scripts import ScriptError
from pipelines.request import Img2ImgRequest
from tests.fixtures.api_helpers import ApiServer, b64_png, decode_png
from tests.fixtures.pictures import half_mask, picture
from tests.fixtures.tiny_controlnets import write_tiny_controlnets
from tests.helpers import SD15, txt2img

SINGLE = "tiny-controlnet-sd15"
FOLDER = "tiny-controlnet-sd15-diffusers"
SDXL = "tiny-controlnet-sdxl-diffusers"
PACKAGE = "sdui_extensions.builtin_controlnet"


def square(size: int = 64, lo: int = 16, hi: int = 48) -> Image.Image:
    """A white square (pixels lo..hi-1) on black."""
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle((lo, lo, hi - 1, hi - 1), fill=(255, 255, 255))
    return image


@pytest.fixture(scope="module")
def cn_engine(tiny_models, engine_factory, tmp_path_factory):
    """An engine of its own with the built-in extensions loaded (no plug-ins)."""
    from webui.extensions import load_extensions

    write_tiny_controlnets(tiny_models / "ControlNet")
    engine = engine_factory(checkpoint_cache=2)
    loaded = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("plugins"))
    record = next(r for r in loaded.records if r.name == "controlnet")
    assert record.loaded, record.error
    engine.loaded_extensions = loaded
    return engine


def unit(**kw) -> dict:
    return {"module": "none", "model": SINGLE, "image": b64_png(picture()), **kw}


def generate(engine, units=None, **kw) -> tuple[np.ndarray, object]:
    request = txt2img(alwayson_scripts={"controlnet": units} if units else {}, **kw)
    result = engine.generate(request)
    return np.asarray(result.images[0], dtype=np.int16), result


def test_canny_map_lies_exactly_on_the_square_border(cn_engine):
    preprocessors = importlib.import_module(f"{PACKAGE}.preprocessors")
    edges = np.asarray(preprocessors.detect(preprocessors.lookup("canny"), square(), 64))[:, :, 0]
    assert set(np.unique(edges)) == {0, 255}
    rows, cols = np.nonzero(edges)
    on_border = np.isin(rows, (15, 16, 47, 48)) | np.isin(cols, (15, 16, 47, 48))
    assert on_border.all()
    inside = (rows >= 15) & (rows <= 48) & (cols >= 15) & (cols <= 48)
    assert inside.all()
    # every side is found along its whole length (corners may round off)
    for line in (edges[15:17, 20:44], edges[47:49, 20:44], edges[20:44, 15:17].T, edges[20:44, 47:49].T):
        assert line.max(axis=0).min() == 255


def test_controlnet_changes_the_image_and_off_switches_are_pixel_equal(cn_engine):
    plain, _ = generate(cn_engine)
    controlled, result = generate(cn_engine, [unit()])
    assert np.abs(controlled - plain).mean() > 1.0
    assert generate(cn_engine, [unit(guidance_end=0.0)])[0].tolist() == plain.tolist()
    assert generate(cn_engine, [unit(weight=0.0)])[0].tolist() == plain.tolist()
    assert generate(cn_engine, [unit(enabled=False)])[0].tolist() == plain.tolist()
    params = parse_infotext(result.infotexts[0])
    assert params["ControlNet 0"].startswith(f"Module: none, Model: {SINGLE} [")
    assert "Weight: 1.0, Resize Mode: Crop and Resize, Guidance Start: 0, Guidance End: 1" in params["ControlNet 0"]
    # no leak: the model is untouched after a ControlNet job
    assert generate(cn_engine)[0].tolist() == plain.tolist()


def test_single_file_and_diffusers_folder_give_the_same_image(cn_engine):
    single, _ = generate(cn_engine, [unit()])
    folder, _ = generate(cn_engine, [unit(model=FOLDER)])
    assert np.array_equal(single, folder)


def test_two_units_weights_modes_and_guidance_window(cn_engine):
    canny = unit(module="canny", image=b64_png(square()), processor_res=64)
    one, _ = generate(cn_engine, [unit()])
    two, result = generate(cn_engine, [unit(), canny])
    assert np.abs(two - one).mean() > 0.5
    assert len(result.extra_images) == 1  # the canny map ("none" has no map of its own)
    assert "ControlNet 1" in parse_infotext(result.infotexts[0])
    stronger, _ = generate(cn_engine, [unit(weight=2.0)])
    assert np.abs(stronger - one).mean() > 0.5
    for mode in ("My prompt is more important", "ControlNet is more important"):
        moded, result = generate(cn_engine, [unit(control_mode=mode)])
        assert np.abs(moded - one).mean() > 0.1, mode
        assert f"Control Mode: {mode}" in parse_infotext(result.infotexts[0])["ControlNet 0"]
    late, _ = generate(cn_engine, [unit(guidance_start=0.5)])
    assert 0 < np.abs(late - one).mean()


def test_detected_map_follows_the_images_in_the_gallery_unless_the_option_is_off(cn_engine, tmp_path):
    from pipelines.options import Options
    from webui.ui.output import gallery_entries

    canny = unit(module="canny", image=b64_png(square()), processor_res=64)
    result = cn_engine.generate(txt2img(alwayson_scripts={"controlnet": [canny]}, batch_size=2))
    assert len(result.images) == 2 and len(result.extra_images) == 1
    files, infotexts, seeds, _ = gallery_entries(result, tmp_path)
    # as A1111 shows it: the grid (when one was made), the two images, then the map (no infotext of its own)
    shown = (result.grid is not None) + 2 + 1
    assert len(files) == len(infotexts) == len(seeds) == shown and infotexts[-1] == ""
    assert np.asarray(Image.open(files[-1])).tolist() == np.asarray(result.extra_images[0]).tolist()
    quiet = cn_engine.generate(txt2img(alwayson_scripts={"controlnet": [canny]}),
                               options=Options(control_net_no_detectmap=True))
    assert quiet.extra_images == [] and len(quiet.images) == 1


def test_a_seg_ufade20k_unit_runs_with_upernet_weights_and_names_them_without(cn_engine):
    from tests.fixtures.tiny_annotators import write_annotators

    annotators = importlib.import_module(f"{PACKAGE}.annotators")
    folder = cn_engine.paths.model_dirs("controlnet_annotator")[0]
    seg = unit(module="seg_ufade20k", processor_res=64)
    with pytest.raises(ScriptError, match=r"needs annotator weights in .*upernet: config.json, pytorch_model.bin"):
        cn_engine.scripts.parse({"controlnet": [seg]})
    write_annotators(folder, ["upernet"])
    try:
        controlled, result = generate(cn_engine, [seg])
        unsegmented, _ = generate(cn_engine, [unit(processor_res=64)])
    finally:
        shutil.rmtree(folder / "upernet")
    assert np.abs(controlled - generate(cn_engine)[0]).mean() > 1.0  # the unit steered the job
    assert not np.array_equal(controlled, unsegmented)  # with the map, not the photo (tiny net: a small change)
    detected = np.asarray(result.extra_images[0])
    assert detected.shape == (64, 64, 3)
    assert {tuple(int(v) for v in c) for c in detected.reshape(-1, 3)} <= set(annotators.ADE20K_PALETTE)
    assert parse_infotext(result.infotexts[0])["ControlNet 0"].startswith(f"Module: seg_ufade20k, Model: {SINGLE} [")


def test_img2img_inpaint_and_hires_pass_get_the_control(cn_engine):
    base = dict(prompt="a painting", steps=4, width=64, height=64, seed=3, checkpoint=SD15, sampler_name="Euler",
                init_images=[picture()], denoising_strength=0.6, save_images=False)
    for extra in ({}, {"mask": half_mask()}):
        plain = cn_engine.generate(Img2ImgRequest(**base, **extra)).images[0]
        # no image in the unit: img2img controls with its init image
        result = cn_engine.generate(Img2ImgRequest(**base, **extra, alwayson_scripts={
            "controlnet": [{"module": "invert", "model": SINGLE}]}))
        diff = np.abs(np.asarray(result.images[0], np.int16) - np.asarray(plain, np.int16))
        assert diff.mean() > 0.5
        if extra:  # inpaint keeps the unmasked half
            assert diff[:, 40:].mean() < diff[:, :24].mean()
        assert len(result.extra_images) == 1
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, steps=3)
    both, result = generate(cn_engine, [unit()], **hires)
    assert result.images[0].size == (96, 96)
    low_only, _ = generate(cn_engine, [unit(hr_option="Low res only")], **hires)
    assert np.abs(both - low_only).mean() > 0.5  # so the hires pass ran with the control at 96x96


def test_sdxl_controlnet_and_a_model_of_the_wrong_family(cn_engine):
    sdxl = dict(checkpoint="tiny-sdxl.safetensors")
    plain, _ = generate(cn_engine, **sdxl)
    for mode in ("Balanced", "ControlNet is more important"):
        controlled, _ = generate(cn_engine, [unit(model=SDXL, control_mode=mode)], **sdxl)
        assert np.abs(controlled - plain).mean() > 0.5, mode
    with pytest.raises(ValueError, match=f"ControlNet unit 0: model {SINGLE} .* is for an SD model with 32-wide"):
        generate(cn_engine, [unit()], **sdxl)
    with pytest.raises(ValueError, match=f"ControlNet unit 0: model {SDXL} .* is for SDXL"):
        generate(cn_engine, [unit(model=SDXL)])
    # A hires checkpoint of another family: the unit says so and how to go on, instead of a shape error...
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, steps=3,
                 hr_checkpoint_name="tiny-sdxl.safetensors")
    with pytest.raises(ValueError, match=f"ControlNet unit 0: model {SINGLE} .* is for an SD model with 32-wide "
                                         r"text embeddings; the hires checkpoint is not: .*'Low res only'"):
        generate(cn_engine, [unit()], **hires)
    # ...and with the unit kept to the first pass, the job runs.
    image, _ = generate(cn_engine, [unit(hr_option="Low res only")], **hires)
    assert image.shape[:2] == (96, 96)


def test_bad_units_fail_before_any_work_naming_the_field(cn_engine):
    cases = [
        (unit(control_mode="Loud"), "unit 0: control_mode: must be one of 'Balanced'"),
        (unit(resize_mode=7), "unit 0: resize_mode: must be one of 'Just Resize'"),
        (unit(weight="heavy"), "unit 0: weight:"),
        (unit(module="sobel"), "unit 0: module: unknown preprocessor 'sobel'"),
        (unit(module="depth_midas"), "needs annotator weights in"),
        (unit(model="nope"), "unit 0: model: no ControlNet model matches 'nope'"),
        (unit(model="None"), "unit 0: model: choose a ControlNet model"),
        (unit(guidance_start=0.8, guidance_end=0.2), "guidance_start (0.8) must not be above guidance_end"),
        (unit(image="not base64!"), "unit 0: image: is not a base64 image"),
    ]
    for bad, message in cases:
        with pytest.raises(ScriptError) as error:
            cn_engine.scripts.parse({"controlnet": [bad]})
        assert message in str(error.value), str(error.value)
    with pytest.raises(ValueError, match="image: a control image is needed"):
        cn_engine.generate(txt2img(alwayson_scripts={"controlnet": [unit(image="")]}))


def test_models_are_titled_by_hash_and_matched_by_prefix(cn_engine):
    script = cn_engine.scripts.get("controlnet")
    titles = script.library.titles()
    assert sorted(t.split(" [")[0] for t in titles) == [SINGLE, FOLDER, SDXL]
    assert all(len(t.split(" [")[1].rstrip("]")) == 8 for t in titles)
    assert script.library.find("tiny-controlnet").name == SINGLE  # the shortest name with that prefix
    for title in titles:
        assert script.library.find(title).name == title.split(" [")[0]


def test_pasting_restores_the_unit_settings(cn_engine):
    ui = importlib.import_module(f"{PACKAGE}.ui")
    _, result = generate(cn_engine, [unit(module="canny", image=b64_png(square()), weight=0.75,
                                          guidance_end=0.5, control_mode="My prompt is more important",
                                          pixel_perfect=True)])
    params = parse_infotext(result.infotexts[0])
    fields = ui.parse_unit_infotext(params["ControlNet 0"])
    assert fields["module"] == "canny" and fields["model"].startswith(SINGLE + " [")
    assert fields["weight"] == 0.75 and fields["guidance_end"] == 0.5 and fields["pixel_perfect"] is True
    assert fields["control_mode"] == "My prompt is more important"
    assert fields["threshold_a"] == 100 and fields["threshold_b"] == 200 and fields["processor_res"] == 64
    assert ui._pasted(0, "enabled")(params) is True and ui._pasted(1, "enabled")(params) is False
    args = ui.to_args([square(), *[fields.get(name, True if name == "enabled" else ui._DEFAULTS[name])
                                   for name in ui.FIELDS]] +
                      [None, False, *[None] * (len(ui.FIELDS) - 1)])
    assert cn_engine.scripts.get("controlnet").parse_args(args)[0].unit.weight == 0.75


def test_accordion_builds_three_units_whose_values_are_unit_dicts(cn_engine):
    import gradio as gr

    from webui.extension_api import TabUi

    builder = cn_engine.loaded_extensions.scripts_for("txt2img")
    build = dict(builder)["controlnet"]
    with gr.Blocks():
        prompt, negative = gr.Textbox(), gr.Textbox()
        controls = build(TabUi("txt2img", prompt, negative))
    ui = importlib.import_module(f"{PACKAGE}.ui")
    assert len(controls.inputs) == ui.UNITS * (1 + len(ui.FIELDS)) == len(controls.paste) + ui.UNITS
    values = [c.value for c in controls.inputs]
    assert controls.to_args(values) == [{"enabled": False}] * ui.UNITS
    assert cn_engine.scripts.get("controlnet").parse_args(controls.to_args(values)) is None


# --- HTTP API ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(cn_engine):
    site = ApiServer(cn_engine, cn_engine.paths.data_dir, cn_engine.loaded_extensions).start()
    yield site.port
    site.stop()


def test_api_txt2img_with_webuiapi_units_returns_the_detected_map(server):
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server, sampler="Euler", steps=4)
    client.set_options({"sd_model_checkpoint": SD15})
    units = [webuiapi.ControlNetUnit(image=square(), module="canny", model=SINGLE, threshold_a=100,
                                     threshold_b=200, processor_res=64, resize_mode="Just Resize")]
    # An explicit dict: webuiapi writes the units into its txt2img's shared default ``alwayson_scripts={}``,
    # which would then send a ControlNet entry with every later webuiapi call in this process.
    result = client.txt2img(prompt="a cat", seed=5, width=64, height=64, controlnet_units=units,
                            alwayson_scripts={})
    assert len(result.images) == 2
    edges = np.asarray(result.images[1])[:, :, 0]
    expected = np.asarray(square())[:, :, 0]
    assert edges[expected == 255].max() == 255 and edges[28:36, 28:36].max() == 0  # a border, not a fill
    params = parse_infotext(read_infotext(result.images[0]))
    assert params["ControlNet 0"].startswith(f"Module: canny, Model: {SINGLE} [")
    assert "Threshold A: 100, Threshold B: 200" in params["ControlNet 0"]


def test_api_controlnet_routes(server):
    url = f"http://127.0.0.1:{server}"
    assert requests.get(f"{url}/controlnet/version", timeout=30).json()["version"] >= 2
    paths = requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]  # /docs headings: the extensions' names
    assert paths["/controlnet/detect"]["post"]["tags"] == ["ControlNet"]
    assert paths["/sdapi/v1/loras"]["get"]["tags"] == ["LoRA"]
    models = requests.get(f"{url}/controlnet/model_list", timeout=30).json()["model_list"]
    assert any(title.startswith(SINGLE + " [") for title in models) and len(models) == 3
    modules = requests.get(f"{url}/controlnet/module_list", timeout=30).json()
    assert {"none", "canny", "invert", "threshold", "lineart_standard"} <= set(modules["module_list"])
    assert modules["module_detail"]["canny"]["available"] is True
    assert modules["module_detail"]["depth_midas"]["available"] is False
    assert "annotators/midas: dpt_hybrid-midas-501f0c75.pt" in modules["module_detail"]["depth_midas"]["reason"]
    detected = requests.post(f"{url}/controlnet/detect", timeout=30, json={
        "controlnet_module": "canny", "controlnet_input_images": [b64_png(square())],
        "controlnet_processor_res": 64, "controlnet_threshold_a": 100, "controlnet_threshold_b": 200}).json()
    assert detected["info"] == "Success"
    edges = np.asarray(decode_png(detected["images"][0]))[:, :, 0]
    assert edges[15:17, 20:44].max(axis=0).min() == 255 and edges[30, 30] == 0


def test_api_bad_unit_field_is_422_naming_it(server):
    url = f"http://127.0.0.1:{server}/sdapi/v1/txt2img"
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64,
            "alwayson_scripts": {"controlnet": {"args": [unit(control_mode="Loud")]}}}
    response = requests.post(url, json=body, timeout=60)
    assert response.status_code == 422
    assert "control_mode" in response.text and "Balanced" in response.text
