"""Face restoration: GFPGAN and CodeFormer through spandrel on random weights in the published layouts, the
RetinaFace detector, restore_faces in jobs (infotext, order), Extras visibilities, and the missing-file message."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.faces import DETECTOR_FILE, FaceRestorers, MissingFaceModel, detect_faces, load_detector
from pipelines.faces.restoration import load_face_model
from pipelines.images.infotext import parse_infotext
from pipelines.plan import RequestError
from pipelines.settings import Paths
from pipelines.upscaling.extras import ExtrasSettings, run_extras
from tests.fixtures.pictures import picture
from tests.helpers import pixels, txt2img


def _changed(before: Image.Image, after: Image.Image) -> float:
    """The share of pixels that differ."""
    a = np.asarray(before.convert("RGB"), dtype=np.int16)
    b = np.asarray(after.convert("RGB"), dtype=np.int16)
    return float((np.abs(a - b).max(axis=2) > 0).mean())


def test_published_layouts_load_offline_through_spandrel(face_models):
    gfpgan = load_face_model(face_models / "GFPGAN" / "GFPGANv1.4.pth", "GFPGAN")
    assert gfpgan.architecture.id == "GFPGAN" and gfpgan.purpose == "FaceSR"
    codeformer = load_face_model(face_models / "Codeformer" / "codeformer-v0.1.0.pth", "CodeFormer")
    assert codeformer.architecture.id == "CodeFormer"
    # A GFPGAN file is not a CodeFormer one: the message names the file.
    with pytest.raises(ValueError, match="GFPGANv1.4.pth: not a CodeFormer model"):
        load_face_model(face_models / "GFPGAN" / "GFPGANv1.4.pth", "CodeFormer")


def test_detector_loads_the_published_layout_and_finds_the_face(face_models, tmp_path):
    detector = load_detector(face_models / "GFPGAN" / DETECTOR_FILE)
    bgr = np.asarray(picture((160, 160)).resize((640, 640)))[:, :, ::-1]
    faces = detect_faces(detector, bgr)
    assert len(faces) == 1  # the test weights see one big face; NMS merges the overlapping boxes
    assert faces[0].score > 0.97 and faces[0].landmarks.shape == (5, 2)
    # A file of another network is refused, naming it.
    torch.save({"conv_first.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / DETECTOR_FILE)
    with pytest.raises(ValueError, match=f"{DETECTOR_FILE}: not a RetinaFace ResNet-50 face detector"):
        load_detector(tmp_path / DETECTOR_FILE)


@pytest.mark.parametrize("name", ["GFPGAN", "CodeFormer"])
def test_restores_a_picture(face_engine, name):
    source = picture((96, 80))
    restored = face_engine.face_restorers.restore(source, name, codeformer_weight=0.5)
    assert restored.size == source.size and restored.mode == source.mode
    values = np.asarray(restored)
    assert values.min() >= 0 and values.max() <= 255
    assert _changed(source, restored) > 0.05  # the face's region is replaced


def test_missing_files_name_the_file_and_the_folder(tmp_path):
    paths = Paths(data_dir=tmp_path, models_dir=tmp_path / "models", outputs_dir=tmp_path / "outputs")
    faces = FaceRestorers(paths)
    with pytest.raises(MissingFaceModel, match=r"put codeformer-v0.1.0.pth .* in models/Codeformer/"):
        faces.restore(picture(), "CodeFormer")
    with pytest.raises(MissingFaceModel, match=r"gfpgan_visibility: .*put GFPGANv1.4.pth .* in models/GFPGAN/"):
        faces.check("GFPGAN", "gfpgan_visibility")
    # The model without the detector: the detector's file is named.
    (tmp_path / "models" / "GFPGAN").mkdir(parents=True)
    torch.save({"params_ema": {"x": torch.zeros(1)}}, tmp_path / "models" / "GFPGAN" / "GFPGANv1.4.pth")
    with pytest.raises(MissingFaceModel, match=rf"put {DETECTOR_FILE} in models/GFPGAN/"):
        faces.check("GFPGAN")
    with pytest.raises(MissingFaceModel, match="face_restoration_model: 'RestoreFormer' is not a face restorer"):
        faces.check("RestoreFormer", "face_restoration_model")


def test_restore_faces_in_a_job_writes_the_infotext_key(face_engine):
    options = face_engine.options.with_overrides({"face_restoration_model": "GFPGAN"})
    plain = face_engine.generate(txt2img(seed=3, width=64, height=64), options=options)
    restored = face_engine.generate(
        txt2img(seed=3, width=64, height=64, restore_faces=True, save_images=True),
        options=options.with_overrides({"save_images_before_face_restoration": True}))
    assert "Face restoration" not in parse_infotext(plain.infotexts[0])
    assert parse_infotext(restored.infotexts[0])["Face restoration"] == "GFPGAN"
    assert ", Seed: 3, Face restoration: GFPGAN, Size: 64x64" in restored.infotexts[0]  # A1111's key order
    assert restored.images[0].size == (64, 64)
    assert _changed(plain.images[0], restored.images[0]) > 0.05
    # save_images_before_face_restoration: the decoded image is saved too, before its faces change (A1111's suffix).
    before = [path for path in restored.paths[0].parent.iterdir() if path.stem.endswith("-before-face-restoration")]
    assert len(before) == 1
    with Image.open(before[0]) as saved:
        assert np.array_equal(pixels(saved.convert("RGB")), pixels(plain.images[0]))
    with Image.open(restored.paths[0]) as saved:
        assert np.array_equal(pixels(saved.convert("RGB")), pixels(restored.images[0]))
    # The same job restores the same way (GFPGAN runs with its trained noise buffers, not fresh noise).
    # The face_restoration option decides when the request leaves restore_faces unset, and a request's False wins.
    by_option = face_engine.generate(txt2img(seed=3, width=64, height=64),
                                     options=options.with_overrides({"face_restoration": True}))
    assert np.array_equal(pixels(by_option.images[0]), pixels(restored.images[0]))
    off = face_engine.generate(txt2img(seed=3, width=64, height=64, restore_faces=False),
                               options=options.with_overrides({"face_restoration": True}))
    assert np.array_equal(pixels(off.images[0]), pixels(plain.images[0]))


def test_a_job_without_the_files_fails_before_running(engine):
    with pytest.raises(RequestError, match="restore_faces: .*put codeformer-v0.1.0.pth") as caught:
        engine.plan(txt2img(restore_faces=True))
    assert caught.value.field == "restore_faces"


def test_extras_visibility(face_engine, tmp_path):
    faces, upscalers, options = face_engine.face_restorers, face_engine.upscalers, face_engine.options
    source = picture((96, 96))
    off = run_extras(upscalers, [source], ExtrasSettings(scale=1.0), options, tmp_path, save=False, faces=faces)
    assert np.array_equal(pixels(off[0].image), pixels(source))  # visibility 0: unchanged, and no face key written
    assert "GFPGAN" not in off[0].infotext
    # Upscaled first (Lanczos x2), then restored: half visibility lies between the upscaled image and its full
    # restoration.
    upscaled = run_extras(upscalers, [source], ExtrasSettings(scale=2.0, upscaler_1="Lanczos"), options, tmp_path,
                          save=False, faces=faces)[0].image
    half = run_extras(upscalers, [source], ExtrasSettings(scale=2.0, upscaler_1="Lanczos", gfpgan_visibility=0.5),
                      options, tmp_path, save=False, faces=faces)[0]
    full = faces.restore(upscaled, "GFPGAN")
    assert half.image.size == (192, 192)
    assert _changed(upscaled, full) > 0.05
    assert parse_infotext(half.infotext)["GFPGAN visibility"] == 0.5
    a, b, c = (np.asarray(image, dtype=np.float32) for image in (upscaled, half.image, full))
    assert np.abs(b - (a + c) / 2).max() <= 1.0


def test_extras_check_names_the_missing_file(engine):
    with pytest.raises(MissingFaceModel, match=r"codeformer_visibility: .*models/Codeformer/"):
        ExtrasSettings(codeformer_visibility=1.0).check(engine.upscalers, engine.face_restorers)


def test_settings_section_face_restoration():
    from webui.ui.settings import option_control, option_sections

    sections = dict(option_sections())
    assert sections["Face restoration"] == ["face_restoration", "face_restoration_model", "code_former_weight",
                                            "face_restoration_unload", "save_images_before_face_restoration"]
    weight = option_control("code_former_weight", 0.5)
    assert (weight.minimum, weight.maximum, weight.value) == (0, 1, 0.5)
    assert option_control("face_restoration_model", "CodeFormer").choices == [("CodeFormer", "CodeFormer"),
                                                                             ("GFPGAN", "GFPGAN")]
