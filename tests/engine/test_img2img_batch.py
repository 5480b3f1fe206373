"""img2img Batch (a folder in, a folder out) and the sketch sub-tabs' image/mask derivation, on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from pipelines.images.saving import read_infotext
from pipelines.images.sketch import inpaint_sketch, sketch_init_image
from pipelines.img2img_batch import BatchSettings, check_batch, check_template, run_img2img_batch
from pipelines.job_control import JobControl
from pipelines.plan import RequestError
from tests.fixtures.pictures import picture
from tests.helpers import SD15, img2img, pixels

RED = (250, 30, 30)  # the colour of picture()'s circle


def painted(color=(20, 200, 40), box=(8, 8, 24, 24)) -> Image.Image:
    image = picture()
    ImageDraw.Draw(image).rectangle(box, fill=color)
    return image


# --- Sketch / Inpaint sketch ----------------------------------------------------------------------


def test_inpaint_sketch_mask_is_the_painted_pixels_and_the_init_image_the_painting():
    image, mask = inpaint_sketch(painted(), picture(), mask_blur=0)
    m = np.asarray(mask)
    assert mask.mode == "L" and mask.size == (64, 64)
    assert (m[8:25, 8:25] == 255).all()
    outside = np.ones_like(m, dtype=bool)
    outside[8:25, 8:25] = False
    assert (m[outside] == 0).all()
    # No blur: the init image is exactly the painted picture.
    assert (pixels(image) == pixels(painted())).all()


def test_inpaint_sketch_paint_in_the_pictures_own_colour_is_not_masked():
    # Red over the red circle (and the gradient around it): only the pixels that change are masked.
    original = picture()
    sketch = painted(color=RED, box=(20, 20, 44, 44))
    _, mask = inpaint_sketch(sketch, original, mask_blur=0)
    m = np.asarray(mask)
    assert m[32, 32] == 0  # centre of the circle: already red
    changed = np.any(np.asarray(sketch) != np.asarray(original), axis=-1)
    assert changed.any() and (m[changed] == 255).all() and (m[~changed] == 0).all()


def test_inpaint_sketch_blur_softens_the_colour_guide_and_transparency_dims_the_mask():
    original, sketch = picture(), painted(box=(16, 16, 47, 47))
    image, mask = inpaint_sketch(sketch, original, mask_blur=4)
    assert np.asarray(mask)[30, 30] == 255  # the mask itself is not blurred here (the engine blurs it)
    got = pixels(image)
    # Far from the painting: the original; in its middle: the paint colour; at its edge: a mix.
    assert (got[:6, :6] == pixels(original)[:6, :6]).all()
    assert np.abs(got[31, 31] - np.array((20, 200, 40))).max() <= 2
    edge = got[31, 16]
    assert not (edge == pixels(original)[31, 16]).all() and not (np.abs(edge - (20, 200, 40)) <= 2).all()
    _, half = inpaint_sketch(sketch, original, mask_blur=0, mask_alpha=50)
    assert abs(int(np.asarray(half)[30, 30]) - 128) <= 1 and np.asarray(half)[0, 0] == 0
    _, none = inpaint_sketch(sketch, original, mask_blur=0, mask_alpha=100)
    assert np.asarray(none).max() == 0
    with pytest.raises(ValueError, match="mask_alpha"):
        inpaint_sketch(sketch, original, mask_blur=0, mask_alpha=150)


def test_sketch_init_image_is_the_painted_picture():
    rgba = painted().convert("RGBA")
    assert sketch_init_image(rgba).mode == "RGB"
    assert (pixels(sketch_init_image(rgba)) == pixels(painted())).all()


def test_inpaint_sketch_through_the_engine_keeps_the_unpainted_part(engine):
    image, mask = inpaint_sketch(painted(), picture(), mask_blur=4)
    result = engine.generate(img2img(init_images=[image], mask=mask, mask_blur=4, denoising_strength=0.9))
    out = pixels(result.images[0])
    # Well away from the painted square (mask blurred twice by 4 px) the picture is kept as it was.
    assert np.abs(out[40:, 40:] - pixels(picture())[40:, 40:]).max() <= 1
    assert np.abs(out[12:20, 12:20] - pixels(image)[12:20, 12:20]).max() > 0
    assert "Mask blur: 4" in result.infotexts[0]


# --- img2img Batch ---------------------------------------------------------------------------------


def template(**overrides) -> dict:
    """img2img(...)'s fields but the image, saved (the batch is about files)."""
    fields = img2img(save_images=True, **overrides).model_dump(exclude={"init_images", "mask"})
    return fields


def with_infotext(image: Image.Image, path, text: str) -> None:
    info = PngInfo()
    info.add_text("parameters", text)
    image.save(path, pnginfo=info)


@pytest.fixture
def batch_engine(engine_factory):
    return engine_factory()


def test_batch_processes_a_folder_into_the_output_folder_and_skips_a_bad_file(batch_engine):
    data = batch_engine.paths.data_dir
    source = data / "batch-in"
    (source / "sub").mkdir(parents=True)
    picture().save(source / "a.png")
    picture().rotate(90).save(source / "sub" / "b.jpg")
    (source / "broken.png").write_text("this is not a picture\n")
    (source / "notes.txt").write_text("not an image file name, not even looked at\n")
    settings = BatchSettings(input_dir="batch-in", output_dir="batch-out")
    folders = check_batch(settings, batch_engine.roots)
    assert [p.name for p in folders.images] == ["a.png", "broken.png", "b.jpg"]
    control = JobControl()
    result, report = run_img2img_batch(batch_engine, template(seed=-1), folders, settings, control)
    assert report.done == ["a.png", "sub/b.jpg"]
    assert len(report.skipped) == 1 and report.skipped[0].startswith("broken.png: not an image")
    assert str(data) not in report.skipped[0]  # the name, never the server's path
    saved = sorted((data / "batch-out").iterdir())
    assert [p.name for p in saved] == ["00000-a.png", "00001-b.png"]
    assert not [p for p in (data / "batch-out").iterdir() if p.name.startswith(".")]  # no temporary left
    infos = [read_infotext(p) for p in saved]
    assert all("Denoising strength: 0.5" in info and "Model: tiny-sd15" in info for info in infos)
    # One seed for the whole batch (a random seed is drawn once).
    assert result.seeds[0] == result.seeds[1] and f"Seed: {result.seeds[0]}," in infos[1]
    assert len(result.images) == 2 and result.infotexts == infos
    assert not (data / "outputs").exists()  # nothing went to the usual folder
    assert control.progress.job_count == 3


def test_batch_without_output_folder_saves_as_usual_and_names_several_images_per_file(batch_engine):
    data = batch_engine.paths.data_dir
    (data / "in2").mkdir()
    picture().save(data / "in2" / "cat.png")
    settings = BatchSettings(input_dir=str(data / "in2"))
    result, report = run_img2img_batch(batch_engine, template(n_iter=2), check_batch(settings, batch_engine.roots),
                                       settings)
    assert report.done == ["cat.png"] and len(result.images) == 2
    saved = sorted((data / "outputs" / "img2img-images").rglob("*.png"))
    assert len(saved) == 2 and all(p.parent.parent.name == "img2img-images" for p in saved)
    # With an output folder the file name follows the input's, numbered per image.
    settings = BatchSettings(input_dir="in2", output_dir="out2")
    run_img2img_batch(batch_engine, template(n_iter=2), check_batch(settings, batch_engine.roots), settings)
    assert sorted(p.name for p in (data / "out2").iterdir()) == ["00000-cat-1.png", "00001-cat-2.png"]


def test_batch_folders_outside_the_allowed_folders_are_refused_naming_the_field(batch_engine, tmp_path):
    roots = batch_engine.roots
    (batch_engine.paths.data_dir / "ok").mkdir()
    picture().save(batch_engine.paths.data_dir / "ok" / "a.png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    picture().save(outside / "a.png")
    cases = [(BatchSettings(input_dir=str(outside)), "Input directory"),
             (BatchSettings(input_dir="../" + outside.name), "Input directory"),
             (BatchSettings(input_dir="ok", output_dir=str(outside)), "Output directory"),
             (BatchSettings(input_dir="ok", inpaint_mask_dir=str(outside)), "Inpaint batch mask directory"),
             (BatchSettings(input_dir="ok", use_png_info=True, png_info_dir=str(outside)), "PNG info directory")]
    for settings, field in cases:
        with pytest.raises(ValueError, match=f"^{field}: .*outside the folders"):
            check_batch(settings, roots)
    # A link inside the data dir to a picture elsewhere is left out, like the folder itself.
    (batch_engine.paths.data_dir / "ok" / "link.png").symlink_to(outside / "a.png")
    assert [p.name for p in check_batch(BatchSettings(input_dir="ok"), roots).images] == ["a.png"]
    with pytest.raises(ValueError, match="^Input directory: give the folder"):
        check_batch(BatchSettings(input_dir=" "), roots)
    (batch_engine.paths.data_dir / "empty").mkdir()
    with pytest.raises(ValueError, match="^Input directory: no images"):
        check_batch(BatchSettings(input_dir="empty"), roots)
    with pytest.raises(ValueError, match="^Parameters to take from png info: unknown 'Size'"):
        check_batch(BatchSettings(input_dir="ok", use_png_info=True, png_info_props=("Size",)), roots)


def test_batch_template_errors_come_before_any_image(batch_engine):
    with pytest.raises(RequestError, match="checkpoint"):
        check_template(batch_engine, template(checkpoint="no-such-model"))
    check_template(batch_engine, template())


def test_inpaint_batch_takes_the_mask_of_the_same_name_and_skips_an_image_without(batch_engine):
    data = batch_engine.paths.data_dir
    (data / "ip").mkdir()
    (data / "masks").mkdir()
    for name in ("left", "right", "nomask"):
        picture().save(data / "ip" / f"{name}.png")
    left = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(left).rectangle((0, 0, 31, 63), fill=255)
    left.save(data / "masks" / "left.png")
    left.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "masks" / "right.png")
    settings = BatchSettings(input_dir="ip", output_dir="ip-out", inpaint_mask_dir="masks")
    result, report = run_img2img_batch(batch_engine, template(mask_blur=0, denoising_strength=1.0),
                                       check_batch(settings, batch_engine.roots), settings)
    assert report.done == ["left.png", "right.png"]
    assert report.skipped == ["nomask.png: no mask named nomask.* in the inpaint batch mask directory"]
    original = pixels(picture())
    out_left, out_right = (pixels(image) for image in result.images)
    assert (out_left[:, 40:] == original[:, 40:]).all() and (out_left[:, :24] != original[:, :24]).any()
    assert (out_right[:, :24] == original[:, :24]).all() and (out_right[:, 40:] != original[:, 40:]).any()
    assert "Mask blur: 0" in result.infotexts[0]
    # One mask in the folder is every image's mask.
    (data / "masks" / "right.png").unlink()
    result, report = run_img2img_batch(batch_engine, template(mask_blur=0), check_batch(settings, batch_engine.roots),
                                       settings)
    assert len(report.done) == 3 and not report.skipped
    assert all((pixels(image)[:, 40:] == original[:, 40:]).all() for image in result.images)


def test_batch_png_info_appends_prompts_and_takes_the_chosen_parameters(batch_engine):
    data = batch_engine.paths.data_dir
    (data / "info").mkdir()
    with_infotext(picture(), data / "info" / "a.png",
                  "a red ball\nNegative prompt: ugly\nSteps: 3, Sampler: DDIM, CFG scale: 5, Seed: 77, Size: 64x64")
    picture().save(data / "info" / "plain.png")
    settings = BatchSettings(input_dir="info", use_png_info=True,
                             png_info_props=("Prompt", "Negative prompt", "Seed", "Steps", "Sampler"))
    result, report = run_img2img_batch(batch_engine, template(prompt="oil", negative_prompt="blurry", seed=5),
                                       check_batch(settings, batch_engine.roots), settings)
    assert report.done == ["a.png", "plain.png"]
    first, second = result.infotexts
    assert first.startswith("oil a red ball\nNegative prompt: blurry ugly\n")
    assert "Steps: 3," in first and "Sampler: DDIM" in first and "Seed: 77," in first and "CFG scale: 7," in first
    # An image without infotext runs with the tab's own values.
    assert second.startswith("oil\nNegative prompt: blurry\n") and "Seed: 5," in second and "Steps: 4," in second


def test_batch_interrupt_stops_after_the_image_being_made(batch_engine):
    data = batch_engine.paths.data_dir
    (data / "many").mkdir()
    for k in range(3):
        picture().save(data / "many" / f"{k}.png")
    settings = BatchSettings(input_dir="many", output_dir="many-out")
    control = JobControl()

    def on_file(index, path):
        if index == 1:
            control.interrupt()

    result, report = run_img2img_batch(batch_engine, template(), check_batch(settings, batch_engine.roots), settings,
                                       control, on_file=on_file)
    assert report.interrupted and result.interrupted
    # The second image was interrupted at its first step and is kept, the third never started.
    assert report.done == ["0.png", "1.png"] and len(result.images) == 2
    assert "Interrupted" in " ".join(report.notes())
    assert SD15 in result.request.checkpoint
