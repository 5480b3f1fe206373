"""sd-webui-controlnet's HTTP routes: version, model and module lists, and running a preprocessor."""

from __future__ import annotations

import base64
import io

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field, field_validator

from .models import ControlNetLibrary
from .preprocessors import control_types, detect, lookup, module_detail, module_names, unavailable_reason
from .units import UNITS, decode_image

#: What /controlnet/version answers; clients only check that it is an integer of this generation.
API_VERSION = 2


class DetectRequest(BaseModel):
    """Body of POST /controlnet/detect."""

    controlnet_module: str = Field("none", description="Preprocessor to run.")
    controlnet_input_images: list[str] = Field(default_factory=list, description="Images, base64.")
    controlnet_processor_res: int = Field(512, description="Short side the preprocessor works at (64 to 2048); "
                                                           "-1 = the module's default.")
    controlnet_threshold_a: float = Field(-1, description="First parameter; -1 = the preprocessor's default.")
    controlnet_threshold_b: float = Field(-1, description="Second parameter; -1 = the preprocessor's default.")

    @field_validator("controlnet_processor_res")
    @classmethod
    def _resolution(cls, value: int) -> int:
        if value != -1 and not 64 <= value <= 2048:
            raise ValueError(f"must be -1 (the module's default) or 64 to 2048, got {value}")
        return value


def _b64_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def add_routes(router: APIRouter, library: ControlNetLibrary) -> APIRouter:
    """Add the /controlnet/* routes to ``router``."""

    @router.get("/controlnet/version")
    def version() -> dict:
        return {"version": API_VERSION}

    @router.get("/controlnet/model_list")
    def model_list(update: bool = True) -> dict:
        if update:
            library.refresh()
        return {"model_list": library.titles()}

    @router.get("/controlnet/module_list")
    def module_list() -> dict:
        return {"module_list": module_names(), "module_detail": module_detail(library.annotators)}

    @router.get("/controlnet/control_types")
    def control_types_route() -> dict:
        """Modules and models grouped by control type, as sd-webui-controlnet lists them."""
        library.refresh()
        return {"control_types": control_types(library.titles())}

    @router.get("/controlnet/settings")
    def settings() -> dict:
        """How many units the UI shows."""
        return {"control_net_unit_count": UNITS}

    @router.post("/controlnet/detect")
    def run_detect(body: DetectRequest) -> dict:
        """The maps of the images (and for the openpose modules, as sd-webui-controlnet, their ``poses``)."""
        def refuse(message: str) -> HTTPException:
            return HTTPException(422, detail=[{"loc": ["body", "controlnet_module"], "type": "value_error",
                                               "msg": f"controlnet_module {body.controlnet_module!r}: {message}"}])

        preprocessor = lookup(body.controlnet_module)
        reason = unavailable_reason(body.controlnet_module, library.annotators)
        if preprocessor is None or reason is not None:
            raise refuse(reason or "unknown module")
        if not body.controlnet_input_images:  # sd-webui-controlnet's answer
            raise HTTPException(422, detail="No image selected")
        images, poses = [], []
        for i, data in enumerate(body.controlnet_input_images):
            try:
                image = decode_image(data)
            except ValueError as error:
                raise HTTPException(422, detail=[{"loc": ["body", "controlnet_input_images", i],
                                                  "type": "value_error",
                                                  "msg": f"controlnet_input_images[{i}] {error}"}]) from None
            if image is None:
                continue
            try:
                detected = detect(preprocessor, image, body.controlnet_processor_res, body.controlnet_threshold_a,
                                  body.controlnet_threshold_b, library.annotators)
            except ValueError as error:  # weights that do not fit their annotator
                raise refuse(str(error)) from None
            images.append(_b64_png(detected))
            if "pose" in detected.info:
                poses.append(detected.info["pose"])
        answer: dict = {"images": images, "info": "Success"}
        if poses:
            answer["poses"] = poses
        return answer

    return router
