"""The Extras routes: extra-single-image and extra-batch-images (docs/compatibility.md §8).

Jobs go through the shared queue like generation jobs. The answers are PNGs that keep the source
image's infotext with the postprocessing keys added. As in A1111, the API never saves them to disk (the
``samples_save`` option is the Extras tab's); the client has them in the answer. Model upscalers run
with the ``upscaler_tile``/``upscaler_tile_overlap`` options.
"""

from __future__ import annotations

import html

from fastapi import APIRouter
from PIL import Image
from starlette.concurrency import run_in_threadpool

from pipelines.faces import MissingFaceModel
from pipelines.images.saving import decode_base64_image, encode_base64_png
from pipelines.upscaling.extras import ExtrasResult, ExtrasSettings, run_extras
from webui.api.errors import ApiError
from webui.api.models import (
    ExtrasBaseRequest,
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
)
from webui.api.routes_generation import QUEUED
from webui.context import AppContext


def _settings(ctx: AppContext, body: ExtrasBaseRequest) -> ExtrasSettings:
    settings = ExtrasSettings(
        resize_mode=body.resize_mode, scale=body.upscaling_resize, width=body.upscaling_resize_w,
        height=body.upscaling_resize_h, crop=body.upscaling_crop, upscaler_1=body.upscaler_1,
        upscaler_2=body.upscaler_2, upscaler_2_visibility=body.extras_upscaler_2_visibility,
        gfpgan_visibility=body.gfpgan_visibility, codeformer_visibility=body.codeformer_visibility,
        codeformer_weight=body.codeformer_weight,
    )
    ctx.upscalers.refresh()  # a model file dropped in since the last request is usable at once
    try:
        settings.check(ctx.upscalers, ctx.engine.face_restorers)
    except MissingFaceModel as error:
        raise ApiError((error.field or "gfpgan_visibility",), str(error)) from None
    except ValueError as error:
        field = str(error).partition(":")[0].split()[0]
        raise ApiError((field,), str(error)) from None
    return settings


def _decode(data: str, loc: tuple) -> Image.Image:
    try:
        return decode_base64_image(data)
    except ValueError as error:
        raise ApiError(loc, f"{'.'.join(map(str, loc))}: {error}") from None


async def _run(ctx: AppContext, images: list[Image.Image], settings: ExtrasSettings) -> list[ExtrasResult]:
    description = f"extras: {len(images)} image(s) with {settings.upscaler_1}"
    options = ctx.options  # the options when the request came, as for generation jobs
    return await ctx.queue.run_async(
        lambda control: run_extras(ctx.upscalers, images, settings, options, ctx.engine.paths.outputs_dir,
                                   control, save=False, faces=ctx.engine.face_restorers),
        source="api", description=description)


def _bounded(images: list[Image.Image], settings: ExtrasSettings) -> list[Image.Image]:
    """``images``, unless an output would have more pixels than --max-image-pixels (422 naming the field)."""
    limit = Image.MAX_IMAGE_PIXELS
    for image in images:
        if settings.resize_mode == 0:
            width, height, field = image.width * settings.scale, image.height * settings.scale, "upscaling_resize"
        else:
            width, height, field = settings.width, settings.height, "upscaling_resize_w"
        if limit and width * height > limit:
            raise ApiError((field,), f"{field}: the output would be {int(width)}x{int(height)} = "
                                     f"{int(width * height)} pixels, more than the limit of {limit} "
                                     "(--max-image-pixels)")
    return images


def _html_info(results: list[ExtrasResult]) -> str:
    return "".join(f"<p>{html.escape(result.infotext)}</p>" for result in results[:1])


def router(ctx: AppContext, route_class: type) -> APIRouter:
    """The extras routes on ``ctx``."""
    api = APIRouter(route_class=route_class, tags=["extras"])

    @api.post("/sdapi/v1/extra-single-image", response_model=ExtrasSingleImageResponse, responses=QUEUED)
    async def extra_single_image(body: ExtrasSingleImageRequest) -> dict:
        """Upscale one image."""
        def prepare() -> tuple[ExtrasSettings, list[Image.Image]]:
            settings = _settings(ctx, body)
            return settings, _bounded([_decode(body.image, ("image",))], settings)

        settings, images = await run_in_threadpool(prepare)
        results = await _run(ctx, images, settings)

        def answer() -> dict:
            image = encode_base64_png(results[0].image, results[0].infotext) if results and \
                body.show_extras_results else None
            return {"image": image, "html_info": _html_info(results)}

        return await run_in_threadpool(answer)

    @api.post("/sdapi/v1/extra-batch-images", response_model=ExtrasBatchImagesResponse, responses=QUEUED)
    async def extra_batch_images(body: ExtrasBatchImagesRequest) -> dict:
        """Upscale several images with the same settings."""
        for field, what in (("input_dir", "send the images in imageList"),
                            ("output_dir", "the images come back in the answer")):
            if getattr(body, field):  # folders on the server are the Extras tab's, inside the allowed folders
                raise ApiError((field,), f"{field}: the API reads and writes no folder on the server; {what}")
        def prepare() -> tuple[ExtrasSettings, list[Image.Image]]:
            settings = _settings(ctx, body)
            images = [_decode(item.data, ("imageList", index, "data")) for index, item in enumerate(body.imageList)]
            return settings, _bounded(images, settings)

        settings, images = await run_in_threadpool(prepare)
        results = await _run(ctx, images, settings)

        def answer() -> dict:
            encoded = [encode_base64_png(r.image, r.infotext) for r in results] if body.show_extras_results else []
            return {"images": encoded, "html_info": _html_info(results)}

        return await run_in_threadpool(answer)

    return api
