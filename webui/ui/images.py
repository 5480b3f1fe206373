"""Image inputs that answer a file that is not an image with one sentence instead of Gradio's error dump.

Gradio decodes an uploaded image before the event handler runs; a file that PIL cannot read (a text file
named ``.png``) would fail there with "Could not preprocess input component ..." and server paths. An
:func:`ImageInput` (and an :func:`ImageEditorInput`, the img2img sketch and inpaint editors) hands the
handler a :class:`NotAnImage` instead, and the handler reports its message where the user looks (under
Generate, in the PNG Info panel).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr


@dataclass(frozen=True)
class NotAnImage:
    """What an :class:`ImageInput` passes on for an upload that could not be read as an image."""

    message: str


def not_an_image_message(label: str | None, name: str) -> str:
    return (f"{label or 'Image'}: the file {name!r} is not an image that can be read; "
            "use a PNG, JPEG, WebP or BMP file.")


def ImageInput(**kwargs: Any) -> gr.Image:  # noqa: N802 - used like the component class it builds
    """A ``gr.Image`` whose unreadable uploads become :class:`NotAnImage` (see the module doc).

    The instance's preprocess is wrapped rather than the class subclassed: Gradio writes a stub file next
    to the module of every component subclass.
    """
    image = gr.Image(**kwargs)
    decode = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - whatever PIL raises for a file that is not an image
            return NotAnImage(not_an_image_message(image.label, _upload_name(payload)))

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _upload_name(payload: Any) -> str:
    """The name the user's file had (never the server's temporary path)."""
    name = getattr(payload, "orig_name", None) or Path(str(getattr(payload, "path", "") or "file")).name
    return Path(name).name


def ImageEditorInput(**kwargs: Any) -> gr.ImageEditor:  # noqa: N802 - used like the component class it builds
    """A ``gr.ImageEditor`` whose unreadable upload becomes :class:`NotAnImage` (its background's file name
    in the message), as :func:`ImageInput` does for a plain image input."""
    editor = gr.ImageEditor(**kwargs)
    decode = editor.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - whatever PIL raises for a file that is not an image
            files = [getattr(payload, "background", None), getattr(payload, "composite", None),
                     *(getattr(payload, "layers", None) or [])]
            named = next((item for item in files if item is not None and not isinstance(item, bytes)), None)
            return NotAnImage(not_an_image_message(editor.label, _upload_name(named) if named else "file"))

    editor.preprocess = preprocess  # type: ignore[method-assign]
    return editor


def check_image(value: Any) -> Any:
    """``value`` unless it is a :class:`NotAnImage`; then ValueError with its message."""
    if isinstance(value, NotAnImage):
        raise ValueError(value.message)
    return value
