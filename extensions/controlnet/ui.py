"""The ControlNet accordion: one tab per unit, whose values become the same unit dicts the API takes."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import gradio as gr

from webui.extension_api import ScriptControls, TabUi

from .models import ControlNetLibrary
from .preprocessors import PREPROCESSORS, detect, lookup, module_names, unavailable_reason
from .units import CONTROL_MODES, RESIZE_MODES, UNION_CONTROL_TYPES, UNITS, ControlNetUnit

#: Unit fields in the order of each unit's inputs after the image.
FIELDS = ("enabled", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode",
          "pixel_perfect", "processor_res", "threshold_a", "threshold_b", "union_control_type")
#: Infotext labels of the ``ControlNet N`` value -> unit fields.
INFOTEXT_FIELDS = {"Module": "module", "Model": "model", "Weight": "weight", "Resize Mode": "resize_mode",
                   "Guidance Start": "guidance_start", "Guidance End": "guidance_end",
                   "Pixel Perfect": "pixel_perfect", "Control Mode": "control_mode",
                   "Processor Res": "processor_res", "Threshold A": "threshold_a", "Threshold B": "threshold_b",
                   "Union Control Type": "union_control_type"}
_DEFAULTS = ControlNetUnit().model_dump(exclude={"image", "mask"})
_PAIR = re.compile(r"\s*([A-Za-z][A-Za-z ]*?):\s*(.*?)\s*(?:,(?=\s*[A-Za-z][A-Za-z ]*?:)|$)")


def parse_unit_infotext(text: str) -> dict[str, Any]:
    """The unit fields written in a ``ControlNet N`` infotext value (unknown labels are skipped)."""
    fields: dict[str, Any] = {}
    for label, value in _PAIR.findall(text):
        name = INFOTEXT_FIELDS.get(label.strip())
        if name is None:
            continue
        default = _DEFAULTS[name]
        if isinstance(default, bool):
            fields[name] = value.strip().lower() == "true"
        elif isinstance(default, int | float):
            try:
                fields[name] = type(default)(float(value))
            except ValueError:
                continue
        else:
            fields[name] = value
    return fields


def _pasted(index: int, name: str) -> Callable[[dict[str, Any]], Any]:
    """Paste function of one control: the field from ``ControlNet index``; without that key the unit is off."""

    def value(params: dict[str, Any]) -> Any:
        text = params.get(f"ControlNet {index}")
        if name == "enabled":
            return text is not None
        fields = parse_unit_infotext(str(text)) if text is not None else {}
        if name == "processor_res" and fields.get(name, -1) == -1:
            return 512
        if name in ("threshold_a", "threshold_b") and fields.get(name, -1) == -1:
            return _slider_default(fields.get("module", "canny"), name)
        return fields.get(name, _DEFAULTS[name])

    return value


def _slider_default(module: str, name: str) -> float:
    preprocessor = PREPROCESSORS.get(module)
    slider = getattr(preprocessor, name, None) if preprocessor else None
    return slider.value if slider is not None else 0


def to_args(values: list[Any]) -> list[dict[str, Any]]:
    """The UI's flat values (per unit: image, then :data:`FIELDS`) as API unit dicts."""
    per_unit = 1 + len(FIELDS)
    units = []
    for start in range(0, len(values), per_unit):
        image, *rest = values[start:start + per_unit]
        unit = dict(zip(FIELDS, rest, strict=True))
        if unit["enabled"]:
            unit["image"] = image
            units.append(unit)
        else:
            units.append({"enabled": False})
    return units


def preview(library: ControlNetLibrary, image: Any, module: str, resolution: float, pixel_perfect: bool,
            threshold_a: float, threshold_b: float) -> Any:
    """The preview button: the unit's map, by the same code as ``/controlnet/detect``; a module that cannot
    run, or no image, is a clear error (a toast)."""
    import gradio as gr

    if image is None:
        raise gr.Error("Control image: upload an image first, then preview the preprocessor's map")
    preprocessor = lookup(module or "")
    reason = unavailable_reason(module or "", library.annotators)
    if preprocessor is None or reason is not None:
        raise gr.Error(f"Preprocessor {module!r}: {reason}")
    try:
        return detect(preprocessor, image, -1 if pixel_perfect else int(resolution), threshold_a, threshold_b,
                      library.annotators)
    except ValueError as error:
        raise gr.Error(f"Preprocessor {module!r}: {error}") from None


def slider_updates(module: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The resolution and threshold sliders for ``module``: sd-webui-controlnet's names, ranges and defaults;
    sliders the module does not have are hidden."""
    import gradio as gr

    preprocessor = lookup(module or "")
    resolution = gr.update(visible=bool(preprocessor and preprocessor.uses_resolution))
    updates = []
    for name in ("threshold_a", "threshold_b"):
        found = getattr(preprocessor, name, None) if preprocessor else None
        if found is None:
            updates.append(gr.update(visible=False))
        else:
            updates.append(gr.update(visible=True, label=found.name, minimum=found.min, maximum=found.max,
                                     step=found.step, value=found.value))
    return resolution, updates[0], updates[1]


def build_ui(library: ControlNetLibrary) -> Callable[[TabUi], ScriptControls]:
    """The accordion builder passed to ``api.add_script``."""

    def build(tab_ui: TabUi) -> ScriptControls:
        inputs: list[Any] = []
        paste: list[tuple[Any, Any]] = []
        prefix = f"{tab_ui.tab}_controlnet"
        with gr.Tabs():
            for index in range(UNITS):
                with gr.Tab(f"Unit {index}"):
                    with gr.Row():
                        image = gr.Image(label="Control image", type="pil", sources=["upload", "clipboard"],
                                         elem_id=f"{prefix}_image_{index}")
                        preview_image = gr.Image(label="Preprocessor Preview", type="pil", interactive=False,
                                                 elem_id=f"{prefix}_preview_image_{index}")
                    with gr.Row():
                        enabled = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}_enable_{index}")
                        pixel_perfect = gr.Checkbox(False, label="Pixel Perfect",
                                                    elem_id=f"{prefix}_pixel_perfect_{index}")
                    with gr.Row(equal_height=True):
                        module = gr.Dropdown(module_names(), value="canny", label="Preprocessor", scale=3,
                                             elem_id=f"{prefix}_module_{index}")
                        run_preview = gr.Button("\U0001f4a5 Preview", scale=1, min_width=100,
                                                elem_id=f"{prefix}_preview_{index}")
                    # The model on a row of its own, full width: titles "name [hash]" are long.
                    with gr.Row(equal_height=True):
                        model = gr.Dropdown(["None", *library.titles()], value="None", label="Model", scale=8,
                                            min_width=320, elem_id=f"{prefix}_model_{index}")
                        refresh = gr.Button("\U0001f504", elem_id=f"{prefix}_refresh_{index}", scale=0,
                                            min_width=48)
                    weight = gr.Slider(0, 2, value=1.0, step=0.05, label="Control Weight",
                                       elem_id=f"{prefix}_weight_{index}")
                    with gr.Row():
                        start = gr.Slider(0, 1, value=0, step=0.01, label="Starting Control Step",
                                          elem_id=f"{prefix}_guidance_start_{index}")
                        end = gr.Slider(0, 1, value=1, step=0.01, label="Ending Control Step",
                                        elem_id=f"{prefix}_guidance_end_{index}")
                    control_mode = gr.Radio(list(CONTROL_MODES), value="Balanced", label="Control Mode",
                                            elem_id=f"{prefix}_control_mode_{index}")
                    resize_mode = gr.Radio(list(RESIZE_MODES), value="Crop and Resize", label="Resize Mode",
                                           elem_id=f"{prefix}_resize_mode_{index}")
                    processor_res = gr.Slider(64, 2048, value=512, step=8, label="Preprocessor Resolution",
                                              elem_id=f"{prefix}_processor_res_{index}")
                    with gr.Row():
                        threshold_a = gr.Slider(1, 255, value=100, step=1, label="Canny Low Threshold",
                                                elem_id=f"{prefix}_threshold_a_{index}")
                        threshold_b = gr.Slider(1, 255, value=200, step=1, label="Canny High Threshold",
                                                elem_id=f"{prefix}_threshold_b_{index}")
                    union_type = gr.Dropdown(list(UNION_CONTROL_TYPES), value="Unknown",
                                             label="Union Control Type (ControlNet Union models)",
                                             elem_id=f"{prefix}_union_control_type_{index}")
                    refresh.click(lambda: gr.update(choices=["None", *(e.title for e in library.refresh())]),
                                  outputs=[model])
                    module.change(slider_updates, inputs=[module], outputs=[processor_res, threshold_a, threshold_b])
                    run_preview.click(lambda *values: preview(library, *values),
                                      inputs=[image, module, processor_res, pixel_perfect, threshold_a, threshold_b],
                                      outputs=[preview_image])
                    controls = [enabled, module, model, weight, start, end, control_mode, resize_mode, pixel_perfect,
                                processor_res, threshold_a, threshold_b, union_type]
                    inputs += [image, *controls]
                    paste += [(control, _pasted(index, name)) for control, name in zip(controls, FIELDS, strict=True)]
        return ScriptControls(inputs=inputs, to_args=to_args, paste=paste)

    return build
