"""ControlNet's network preprocessors on random-weight annotators of the real architectures, written in the
published layouts (tests/fixtures/tiny_annotators.py): each loads offline through the safe reader and returns a
map of the input's size; missing weights name the file and where it goes; the API serves them."""

from __future__ import annotations

import pickle
import types

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from extensions.controlnet import preprocessors
from extensions.controlnet.annotators import ADE20K_PALETTE, NETWORK_PREPROCESSORS, AnnotatorCache
from extensions.controlnet.models import ControlNetLibrary
from extensions.controlnet.routes import add_routes
from tests.fixtures.api_helpers import b64_png, decode_png
from tests.fixtures.tiny_annotators import write_annotators
from webui.extension_api import ModelFileError, UnsafeCheckpointError

NETWORK_MODULES = [p.name for p in NETWORK_PREPROCESSORS]


def photo(width: int = 80, height: int = 48) -> Image.Image:
    """A seeded noisy picture with a bright block: something for every annotator to look at."""
    pixels = (np.random.RandomState(0).rand(height, width, 3) * 80).astype(np.uint8)
    pixels[10:38, 20:50] += 150
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def annotator_root(tmp_path_factory):
    return write_annotators(tmp_path_factory.mktemp("annotators"))


@pytest.fixture(scope="module")
def cache(annotator_root):
    return AnnotatorCache(lambda: (annotator_root,), lambda: torch.device("cpu"), lambda: "normal", size=20)


@pytest.mark.parametrize("module", NETWORK_MODULES)
def test_each_network_module_loads_offline_and_maps_at_the_input_size(cache, module):
    preprocessor = preprocessors.lookup(module)
    assert preprocessor is not None and preprocessors.unavailable_reason(module, cache) is None
    detected = preprocessors.detect(preprocessor, photo(), 64, annotators=cache)
    pixels = np.asarray(detected)
    # short side 48 -> 64 (the processor resolution), long side 80 -> 107; an RGB uint8 map
    assert detected.mode == "RGB" and pixels.shape == (64, 107, 3) and pixels.dtype == np.uint8
    if module.startswith("depth_"):  # relative depth scaled to the full 0-255 range (then resized)
        assert pixels.min() <= 2 and pixels.max() >= 250
    if module.startswith("openpose"):  # the pose JSON sd-webui-controlnet's API returns
        pose = detected.info["pose"]
        assert pose["canvas_width"] == 107 and pose["canvas_height"] == 64 and isinstance(pose["people"], list)
    elif module not in ("softedge_pidisafe",):  # a real picture, not a constant (pidisafe quantises to steps)
        assert pixels.std() > 0


def test_the_ade20k_palette_is_mmsegs():
    assert len(ADE20K_PALETTE) == 150 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE)
    assert ADE20K_PALETTE[:5] == ((120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3))
    assert ADE20K_PALETTE[2] == (6, 230, 230)  # sky
    assert ADE20K_PALETTE[12] == (150, 5, 61)  # person
    assert ADE20K_PALETTE[-2:] == ((102, 255, 0), (92, 0, 255))  # clock, flag
    assert len(set(ADE20K_PALETTE)) == 149 and ADE20K_PALETTE[6] == ADE20K_PALETTE[48]  # road, skyscraper (mmseg)


def test_seg_ufade20k_colours_each_pixel_by_the_upernets_class(cache, annotator_root):
    from transformers import UperNetForSemanticSegmentation

    image = photo(96, 64)  # multiples of 32 at the processor resolution 64: no resizing, pixel for pixel
    detected = np.asarray(preprocessors.detect(preprocessors.lookup("seg_ufade20k"), image, 64, annotators=cache))
    assert detected.shape == (64, 96, 3)
    colours = {tuple(int(v) for v in c) for c in detected.reshape(-1, 3)}
    assert colours <= set(ADE20K_PALETTE) and len(colours) > 1
    # the same folder through transformers' own loader gives the same classes
    model = UperNetForSemanticSegmentation.from_pretrained(annotator_root / "upernet", dtype=torch.float32).eval()
    pixels = (np.asarray(image, np.float32) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]).logits
    expected = np.array(ADE20K_PALETTE, np.uint8)[logits[0].argmax(0).numpy()]
    assert np.array_equal(detected, expected)
    # a size the net cannot take (not multiples of 32): classes resized back (nearest), still palette colours
    odd = np.asarray(preprocessors.detect(preprocessors.lookup("seg_ufade20k"), photo(70, 45), 45, annotators=cache))
    assert odd.shape == (45, 70, 3)
    assert {tuple(int(v) for v in c) for c in odd.reshape(-1, 3)} <= set(ADE20K_PALETTE)


def test_seg_ufade20k_without_weights_names_its_files(tmp_path):
    empty = AnnotatorCache(lambda: (tmp_path,), lambda: torch.device("cpu"), lambda: "normal")
    reason = preprocessors.unavailable_reason("seg_ufade20k", empty)
    assert reason == f"needs annotator weights in {tmp_path / 'upernet'}: config.json, pytorch_model.bin"
    detail = preprocessors.module_detail(empty)["seg_ufade20k"]
    assert detail["weights"] == {"folder": "upernet", "files": ["config.json", "pytorch_model.bin"]}
    assert [s["name"] for s in detail["sliders"]] == ["Resolution"]
    with pytest.raises(ValueError, match="module 'seg_ufade20k' is unavailable: needs annotator weights in .*upernet"):
        preprocessors.detect(preprocessors.lookup("seg_ufade20k"), photo(), 64, annotators=empty)


def test_the_loaded_networks_hold_the_files_weights(cache, annotator_root):
    from webui.extension_api import read_weights

    preprocessors.detect(preprocessors.lookup("softedge_hed"), photo(), 64, annotators=cache)
    hed = next(d for d in cache.loaded() if type(d).__name__ == "HEDdetector")
    saved = read_weights(annotator_root / "hed" / "ControlNetHED.pth")
    loaded = hed.netNetwork.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[key].float(), loaded[key]) for key in saved)


def test_missing_weights_name_the_file_and_the_other_modules_still_work(tmp_path):
    empty = AnnotatorCache(lambda: (tmp_path,), lambda: torch.device("cpu"), lambda: "normal")
    reason = preprocessors.unavailable_reason("softedge_hed", empty)
    assert reason == f"needs annotator weights in {tmp_path / 'hed'}: ControlNetHED.pth"
    detail = preprocessors.module_detail(empty)
    assert detail["softedge_hed"]["available"] is False and detail["softedge_hed"]["reason"] == reason
    assert detail["openpose_full"]["weights"] == {
        "folder": "openpose", "files": ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"]}
    assert detail["canny"]["available"] is True
    with pytest.raises(ValueError, match="module 'softedge_hed' is unavailable: needs annotator weights in .*hed: "
                                         "ControlNetHED.pth"):
        preprocessors.detect(preprocessors.lookup("softedge_hed"), photo(), 64, annotators=empty)
    assert np.asarray(preprocessors.detect(preprocessors.lookup("canny"), photo(), 64, annotators=empty)).max() == 255


def test_sliders_carry_sd_webui_controlnets_names_and_ranges():
    detail = preprocessors.module_detail(None)
    assert detail["canny"]["sliders"][1:] == [
        {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]
    assert detail["tile_resample"]["sliders"] == [
        {"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}]
    assert [s["name"] for s in detail["tile_colorfix+sharp"]["sliders"]] == ["Variation", "Sharpness"]
    assert [s["name"] for s in detail["depth_midas"]["sliders"]] == ["Resolution"]
    assert detail["seg_ofade20k"]["available"] is False


def test_weight_free_tile_and_shuffle():
    image = photo(96, 64)
    resampled = preprocessors.detect(preprocessors.lookup("tile_resample"), image, -1, 2.0)
    assert resampled.size == (48, 32)
    assert preprocessors.detect(preprocessors.lookup("tile_colorfix"), image, -1).tobytes() == image.tobytes()
    one = preprocessors.detect(preprocessors.lookup("shuffle"), image, 64)
    assert one.size == (96, 64) and one.tobytes() == preprocessors.detect(
        preprocessors.lookup("shuffle"), image, 64).tobytes()  # seeded: a job can be repeated
    assert one.tobytes() != image.tobytes()


def test_wrong_and_unsafe_files_are_refused_naming_them(tmp_path):
    folder = tmp_path / "hed"
    folder.mkdir()
    torch.save({"conv.weight": torch.zeros(2, 2)}, folder / "ControlNetHED.pth")
    cache = AnnotatorCache(lambda: (tmp_path,), lambda: torch.device("cpu"), lambda: "normal")
    with pytest.raises(ModelFileError, match="ControlNetHED.pth: not the weights this annotator expects"):
        preprocessors.detect(preprocessors.lookup("softedge_hed"), photo(), 64, annotators=cache)
    (folder / "ControlNetHED.pth").write_bytes(pickle.dumps({"x": types.SimpleNamespace(a=1)}))
    with pytest.raises(UnsafeCheckpointError):
        preprocessors.detect(preprocessors.lookup("softedge_hed"), photo(), 64, annotators=cache)


def test_the_cache_keeps_the_most_recent_detectors(annotator_root):
    small = AnnotatorCache(lambda: (annotator_root,), lambda: torch.device("cpu"), lambda: "normal", size=2)
    for module in ("lineart_realistic", "softedge_hed", "lineart_realistic", "softedge_pidinet"):
        preprocessors.detect(preprocessors.lookup(module), photo(), 64, annotators=small)
    assert [type(d).__name__ for d in small.loaded()] == ["LineartDetector", "PidiNetDetector"]


def test_api_detect_serves_network_modules_with_poses(annotator_root, tmp_path):
    library = ControlNetLibrary(folders=lambda: (tmp_path,), file_hash=lambda path: "0" * 64,
                                device=lambda: torch.device("cpu"), dtype=lambda: torch.float32,
                                annotator_folders=lambda: (annotator_root,))
    app = FastAPI()
    app.include_router(add_routes(__import__("fastapi").APIRouter(), library))
    client = TestClient(app)
    modules = client.get("/controlnet/module_list").json()
    assert all(modules["module_detail"][name]["available"] for name in NETWORK_MODULES)
    answer = client.post("/controlnet/detect", json={"controlnet_module": "openpose",
                                                     "controlnet_input_images": [b64_png(photo())],
                                                     "controlnet_processor_res": 64}).json()
    assert decode_png(answer["images"][0]).size == (107, 64)
    assert answer["poses"][0]["canvas_width"] == 107
    depth = client.post("/controlnet/detect", json={"controlnet_module": "depth_anything_v2",
                                                    "controlnet_input_images": [b64_png(photo())]}).json()
    assert decode_png(depth["images"][0]).size == (853, 512)  # the default resolution 512
    library_without = ControlNetLibrary(folders=lambda: (tmp_path,), file_hash=lambda path: "0" * 64,
                                        device=lambda: torch.device("cpu"), dtype=lambda: torch.float32,
                                        annotator_folders=lambda: (tmp_path / "none",))
    app2 = FastAPI()
    app2.include_router(add_routes(__import__("fastapi").APIRouter(), library_without))
    refused = TestClient(app2).post("/controlnet/detect", json={"controlnet_module": "depth_midas",
                                                                 "controlnet_input_images": [b64_png(photo())]})
    assert refused.status_code == 422
    assert "dpt_hybrid-midas-501f0c75.pt" in refused.text and "controlnet_module" in refused.text


def test_under_medvram_a_detector_leaves_the_gpu_after_detection(tmp_path):
    from extensions.controlnet.kinds import Annotator, Preprocessor

    class Recorder:
        def __init__(self):
            self.moves: list[str] = []

        def to(self, device):
            self.moves.append(str(device))
            return self

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "w.pth").write_bytes(b"")
    recorder = Recorder()
    fake = Preprocessor("fake", lambda rgb, a, b, detector: rgb,
                        annotator=Annotator("fake", ("w.pth",), lambda folder: recorder))
    for mode, expected in (("normal", ["cuda"]), ("medvram", ["cuda", "cpu"]), ("lowvram", ["cuda", "cpu"])):
        recorder.moves.clear()
        cache = AnnotatorCache(lambda: (tmp_path,), lambda: torch.device("cuda"), lambda m=mode: m)
        preprocessors.detect(fake, photo(), 64, annotators=cache)
        assert recorder.moves == expected, mode
