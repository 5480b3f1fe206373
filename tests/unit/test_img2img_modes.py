"""img2img's sub-tab inputs without a browser: Inpaint sketch values, unreadable editor uploads in one sentence."""

from __future__ import annotations

import json

import gradio as gr
import numpy as np
import pytest
from gradio.components.image_editor import EditorData
from gradio.data_classes import FileData
from PIL import ImageDraw

from tests.fixtures.pictures import picture
from webui.ui.images import ImageEditorInput, NotAnImage
from webui.ui.img2img import source_images
from webui.ui.img2img_modes import editor_value


def sketch_value():
    painted = picture()
    ImageDraw.Draw(painted).rectangle((8, 8, 24, 24), fill=(20, 200, 40))
    return {"background": picture(), "layers": [], "composite": painted}


def test_inpaint_sketch_sub_tab_gives_the_painting_as_init_image_and_mask():
    init, mask = source_images("inpaint_sketch", None, None, None, None, None, sketch_value(), mask_blur=0)
    m = np.asarray(mask)
    assert (m[8:25, 8:25] == 255).all() and m.sum() == 17 * 17 * 255
    assert (np.asarray(init) == np.asarray(sketch_value()["composite"])).all()
    with pytest.raises(ValueError, match="^mask: paint over"):
        source_images("inpaint_sketch", None, None, None, None, None,
                      {"background": picture(), "layers": [], "composite": picture()})
    with pytest.raises(ValueError, match="^init_images: upload an image in the Inpaint sketch tab"):
        source_images("inpaint_sketch", None, None, None, None, None, None)


def test_an_unreadable_upload_in_another_sub_tab_does_not_matter():
    bad = NotAnImage("Image for img2img: the file 'x.png' is not an image that can be read; use a PNG file.")
    init, mask = source_images("inpaint_sketch", bad, bad, bad, bad, bad, sketch_value(), mask_blur=0)
    assert mask is not None and init.size == (64, 64)
    with pytest.raises(ValueError, match="^Image for img2img: the file 'x.png'"):
        source_images("img2img", bad, None, None, None, None)


def test_an_editor_left_empty_by_an_unreadable_file_names_the_file():
    with gr.Blocks():
        editor = ImageEditorInput(label="Color sketch inpainting", elem_id="inpaint_sketch", type="pil")
    empty = {"background": None, "layers": [], "composite": None}
    noted = json.dumps({"inpaint_sketch": "holiday.png"})
    value = editor_value(empty, editor, noted)
    assert isinstance(value, NotAnImage)
    assert value.message == ("Color sketch inpainting: the file 'holiday.png' is not an image that can be read; "
                             "use a PNG, JPEG, WebP or BMP file.")
    with pytest.raises(ValueError, match="^Color sketch inpainting: the file 'holiday.png'"):
        source_images("inpaint_sketch", None, None, None, None, None, value)
    # Another editor's bad file, an image in this one, or no note at all: the value as it is.
    assert editor_value(empty, editor, json.dumps({"img2maskimg": "x.png"})) is empty
    assert editor_value(sketch_value(), editor, noted)["background"] is not None
    assert editor_value(empty, editor, "not json") is empty


def test_the_editor_turns_a_file_the_server_cannot_read_into_one_sentence(tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not a picture\n")
    with gr.Blocks():
        editor = ImageEditorInput(label="Sketch", elem_id="img2img_sketch", type="pil")
    payload = EditorData(background=FileData(path=str(fake), orig_name="holiday.png"), layers=[],
                         composite=FileData(path=str(fake), orig_name="holiday.png"))
    value = editor.preprocess(payload)
    assert isinstance(value, NotAnImage) and "'holiday.png' is not an image" in value.message
    assert str(tmp_path) not in value.message
