"""Live previews that never stall the GPU.

Making a preview image needs its pixels on the host, and a plain ``.cpu()`` in the step loop makes the
host wait until the GPU has finished every queued step: the GPU then idles while Python queues the next
one. :class:`PreviewMaker` instead starts a non-blocking copy into pinned memory at the step a preview is
asked for, marks it with a CUDA event, and turns it into an image at a later step, once the event says
the copy has landed. On the CPU (and other devices) the image is made at once, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image

from pipelines.models.taesd import taesd_decoder
from pipelines.sampling.latents import approx_preview_pixels

log = logging.getLogger(__name__)

#: Latents (B, C, h, w) -> RGB pixels (3, H, W) in [0, 1] on the latents' device, for the first image.
PreviewDecoder = Callable[[torch.Tensor], torch.Tensor]


def _to_image(array) -> Image.Image:
    return Image.fromarray(array)


class PreviewMaker:
    """Previews of the current latents; :meth:`submit` queues one, :meth:`poll` returns it when ready.

    ``decoder`` turns latents into full-size pixels (a tiny VAE); without one the cheap latent-to-RGB
    approximation is used (latent size, shown 2x with nearest neighbour, as :func:`latents.preview`).
    """

    def __init__(self, family: str, decoder: PreviewDecoder | None = None):
        self.family = family
        self.decoder = decoder
        self._pinned: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._ready: Image.Image | None = None

    def _pixels(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is not None:
            rgb = self.decoder(latents[:1])
        else:
            rgb = approx_preview_pixels(latents, self.family)
        # uint8 on the device: the copy is a quarter of the float size.
        return rgb.clamp(0, 1).mul(255).byte().permute(1, 2, 0).contiguous()

    def submit(self, latents: torch.Tensor) -> None:
        """Start making a preview of ``latents[0]``; returns without waiting for the device."""
        pixels = self._pixels(latents)
        if pixels.device.type != "cuda":
            self._ready = self._finish(pixels.cpu().numpy())
            self._event = None
            return
        if self._pinned is None or self._pinned.shape != pixels.shape:
            self._pinned = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        elif self._event is not None and not self._event.query():
            return  # the last copy is still in flight: skip this preview rather than wait for it
        self._pinned.copy_(pixels, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def poll(self) -> Image.Image | None:
        """The newest finished preview not yet returned, or None; never waits for the device."""
        # The pinned buffer exists whenever an event does (submit makes it first).
        if self._event is not None and self._pinned is not None and self._event.query():
            self._event = None
            self._ready = self._finish(self._pinned.numpy())
        ready, self._ready = self._ready, None
        return ready

    def wait(self) -> Image.Image | None:
        """The preview last submitted, waiting for it if needed (for an on-demand preview)."""
        if self._event is not None:
            self._event.synchronize()
        return self.poll()

    def _finish(self, array) -> Image.Image:
        image = _to_image(array.copy())
        if self.decoder is None:
            image = image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST)
        return image


def preview_maker(model, method: str = "Approx cheap") -> PreviewMaker:
    """The preview maker for a job on ``model`` (a LoadedModel): TAESD when asked for and its weights are
    in ``models/VAE-taesd``, else the cheap approximation."""
    decoder = None
    if method == "TAESD" and getattr(model, "taesd_error", None) is None:
        try:
            decoder = taesd_decoder(model)
        except Exception as error:  # a broken or unsafe file must not fail the job: previews only
            model.taesd_error = f"TAESD previews: {error}; using Approx cheap previews instead"
            log.warning("%s", model.taesd_error)
    return PreviewMaker(model.family.name, decoder)


class StepReporter:
    """What happens at every denoising step of a job: the interrupt/skip check, the always-on scripts'
    step hook, a live preview every so often, and the progress update. :meth:`step` is the denoise loop's
    ``on_step``; :meth:`check` and :meth:`tile_progress` serve an image upscaler's tiles.
    """

    def __init__(self, control, model, preview_type: str = "Approx cheap",
                 on_step: Callable[[int, torch.Tensor], None] | None = None):
        self.control = control
        self.preview_type = preview_type
        self._on_step = on_step
        self.previews = preview_maker(model, preview_type)

    def use_model(self, model) -> None:
        """Previews from now on are of ``model``'s latents (the hires pass's checkpoint)."""
        self.previews = preview_maker(model, self.preview_type)

    def step(self, step: int, latents: torch.Tensor) -> None:
        """Called before every UNet call; raises JobInterrupted / BatchSkipped when asked to stop."""
        self.control.check()
        if self._on_step is not None:
            self._on_step(step, latents)
        if self.control.wants_preview(step) and step:
            self.previews.submit(latents)
        self.control.update(step=step, preview=self.previews.poll())

    def check(self) -> None:
        """Raise if the job was interrupted or its batch skipped (between an upscaler's tiles, ...)."""
        self.control.check()

    def tile_progress(self, done: int, total: int) -> None:
        """Progress of an image upscaler: ``done`` of ``total`` tiles."""
        self.control.update(step=done, steps=total)
