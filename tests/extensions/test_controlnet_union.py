"""ControlNet Union (ProMax) with its control types on the tiny SDXL model, and a T2I-Adapter on the tiny SD 1.5
model, as ControlNet units (models in an extra ControlNet folder, ``--controlnet-dir``)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.images.infotext import parse_infotext
from tests.fixtures.api_helpers import b64_png
from tests.fixtures.pictures import picture
from tests.fixtures.tiny_controlnets import write_union_and_adapter
from tests.helpers import txt2img

SDXL = dict(checkpoint="tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def union_engine(tiny_models, tmp_path_factory):
    from pipelines.engine import Engine
    from pipelines.settings import EngineSettings, Paths
    from webui.extensions import load_extensions

    extra = tmp_path_factory.mktemp("controlnet-extra")
    write_union_and_adapter(extra)
    data = tmp_path_factory.mktemp("data")
    paths = Paths(data_dir=data, models_dir=tiny_models, outputs_dir=data / "outputs",
                  extra_dirs={"controlnet": (extra,)})
    engine = Engine(EngineSettings(paths=paths, device="cpu", checkpoint_cache=2))
    loaded = load_extensions(engine, plugin_dir=tmp_path_factory.mktemp("plugins"))
    engine.loaded_extensions = loaded
    return engine


def run(engine, units=None, **kw):
    result = engine.generate(txt2img(alwayson_scripts={"controlnet": units} if units else {}, **kw))
    return np.asarray(result.images[0], dtype=np.int16), result


def unit(**kw) -> dict:
    return {"module": "none", "image": b64_png(picture()), **kw}


def test_union_model_runs_with_its_control_type(union_engine):
    plain, _ = run(union_engine, **SDXL)
    depth, result = run(union_engine, [unit(model="tiny-controlnet-union-sdxl", union_control_type="Depth")], **SDXL)
    assert np.abs(depth - plain).mean() > 0.5
    assert "Union Control Type: Depth" in parse_infotext(result.infotexts[0])["ControlNet 0"]
    from extensions.controlnet.ui import parse_unit_infotext  # pasting restores it

    assert parse_unit_infotext(parse_infotext(result.infotexts[0])["ControlNet 0"])["union_control_type"] == "Depth"
    pose, _ = run(union_engine, [unit(model="tiny-controlnet-union-sdxl", union_control_type="OpenPose")], **SDXL)
    assert np.abs(pose - depth).mean() > 0.1  # the type is an input of the model
    # "Unknown" takes the type from the preprocessor: canny is a hard edge
    canny, result = run(union_engine, [unit(model="tiny-controlnet-union-sdxl", module="canny")], **SDXL)
    assert "Union Control Type: Hard Edge" in parse_infotext(result.infotexts[0])["ControlNet 0"]
    hard, _ = run(union_engine, [unit(model="tiny-controlnet-union-sdxl", module="canny",
                                      union_control_type="Hard Edge")], **SDXL)
    assert np.array_equal(canny, hard)
    with pytest.raises(ValueError, match="union_control_type: .* preprocessor 'none' implies no control type; "
                                         "choose one of OpenPose, Depth"):
        run(union_engine, [unit(model="tiny-controlnet-union-sdxl")], **SDXL)
    with pytest.raises(Exception, match="union_control_type: must be one of 'OpenPose'"):
        union_engine.scripts.parse({"controlnet": [unit(model="tiny-controlnet-union-sdxl",
                                                        union_control_type="Sketchy")]})


def test_t2i_adapter_changes_the_image_and_is_refused_on_sdxl(union_engine):
    plain, _ = run(union_engine)
    adapted, result = run(union_engine, [unit(model="tiny-t2iadapter-sd15")])
    assert np.abs(adapted - plain).mean() > 0.5
    weaker, _ = run(union_engine, [unit(model="tiny-t2iadapter-sd15", weight=0.3)])
    assert 0 < np.abs(weaker - plain).mean() < np.abs(adapted - plain).mean()
    assert run(union_engine, [unit(model="tiny-t2iadapter-sd15", weight=0.0)])[0].tolist() == plain.tolist()
    assert result.infotexts[0].count("tiny-t2iadapter-sd15 [") == 1
    with pytest.raises(ValueError, match="model tiny-t2iadapter-sd15 .* is for SD 1.x/2.x"):
        run(union_engine, [unit(model="tiny-t2iadapter-sd15")], **SDXL)
