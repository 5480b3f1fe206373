"""Error answers of the API: 422 naming the field and its allowed range, clear 500s for engine failures.

Handled in a route class rather than app-wide exception handlers, because with ``--api`` the routes live
on Gradio's FastAPI app, whose own error handling must stay as it is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from pipelines.engine import EngineError
from pipelines.models.weights import ModelFileError
from pipelines.plan import RequestError
from pipelines.plugins.scripts import ScriptError
from webui.job_queue import JobCancelled, QueueFull

log = logging.getLogger("webui.api")

Loc = tuple[str | int, ...]
_MAX_INPUT_ECHO = 80
_BOUND_ERRORS = {"greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number",
                 "string_too_long", "string_too_short", "too_long", "too_short"}
_LENGTH_ERRORS = {"string_too_long", "string_too_short"}


#: Engine request fields whose value a client sends as an option (``override_settings`` or POST options).
_OPTION_FIELDS = {"checkpoint": "sd_model_checkpoint", "vae": "sd_vae"}


def model_file_loc(error: ModelFileError, options: Iterable[str] = ()) -> Loc:
    """Where the request chose the unusable file of ``error``: its field as a loc (``"alwayson_scripts.controlnet
    .args.0.model"`` -> ``("alwayson_scripts", "controlnet", "args", 0, "model")``); a checkpoint or VAE chosen
    through the options ``options`` (``override_settings`` keys) under ``override_settings``."""
    field = error.field or ""
    option = _OPTION_FIELDS.get(field)
    if option is not None:
        return ("override_settings", option) if option in options else (option,)
    return tuple(int(part) if part.isdigit() else part for part in field.split(".") if part)


def model_file_error(error: ModelFileError, loc: Loc) -> ApiError:
    """The 422 of an unusable model file the request chose at ``loc``: names the field, the file and why
    (logged for the operator too)."""
    log.warning("API request chose an unusable model file (%s): %s", ".".join(map(str, loc)) or "?", error)
    return ApiError.from_errors([{"loc": ["body", *loc], "msg": str(error), "type": "model_file_error"}])


class StateConflict(Exception):
    """The request is fine but the server's state is not (the selected checkpoint cannot be loaded): 409."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class ApiError(Exception):
    """Bad input found after the body parsed (an image that is not an image, a model that does not exist).

    Answered as 422 in FastAPI's usual shape, ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``.
    """

    def __init__(self, loc: Loc, msg: str, type_: str = "value_error"):
        super().__init__(msg)
        self.errors = [{"loc": ["body", *loc], "msg": msg, "type": type_}]

    @classmethod
    def from_errors(cls, errors: list[dict[str, Any]]) -> ApiError:
        """One ApiError carrying several already explained errors (see :func:`validation_errors`)."""
        error = cls((), "; ".join(e["msg"] for e in errors))
        error.errors = errors
        return error


def _echo(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_INPUT_ECHO else f"{text[:_MAX_INPUT_ECHO]}... ({len(text)} characters)"


def _bounds(model: type[BaseModel] | None, name: str) -> dict[str, Any]:
    field = model.model_fields.get(name) if model is not None else None
    found: dict[str, Any] = {}
    for item in field.metadata if field is not None else ():
        for kind, key in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt"), (MaxLen, "max_length"),
                          (MinLen, "min_length")):
            if isinstance(item, kind):
                found[key] = getattr(item, key)
    return found


def range_text(bounds: dict[str, Any], unit: str = "") -> str:
    """'between 1 and 150', 'at least 0', 'at most 20000 characters' from a field's declared bounds."""
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    if "max_length" in bounds or "min_length" in bounds:
        low, high = bounds.get("min_length"), bounds.get("max_length")
        unit = f" {unit}" if unit else ""
    else:
        unit = ""
    if low is not None and high is not None:
        return f"between {low} and {high}{unit}"
    if low is not None:
        return f"at least {low}{unit}"
    return f"at most {high}{unit}" if high is not None else ""


def _explain(error: dict[str, Any], model: type[BaseModel] | None, prefix: Loc) -> dict[str, Any]:
    loc = tuple(error.get("loc", ()))
    # Engine request errors name engine fields; the API field of the same name is where the value came from.
    loc = prefix + loc if prefix and loc[:1] != ("body",) else loc
    name = next((part for part in reversed(loc) if isinstance(part, str) and part != "body"), "")
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    named = msg.partition(":")[0]
    if not name and model is not None and named in model.model_fields:
        # A check across fields (model validator) names its field at the start of the message.
        name, loc = named, (*loc, named)
    value, kind = error.get("input"), error.get("type")
    bounds = _bounds(model, name) if kind in _BOUND_ERRORS else {}
    allowed = range_text(bounds, "characters" if isinstance(value, str) else "items")
    if allowed:
        # "NaN" may come as a string that parsed as a number: it is still not finite.
        not_finite = kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value))
        finite = " a finite number" if not_finite else ""
        # Only a length error is about the text's length; a 1 MB prompt is never echoed back.
        shown = f"{len(value)} characters" if kind in _LENGTH_ERRORS and isinstance(value, str) else _echo(value)
        msg = f"{name} must be{finite} {allowed}, got {shown}"
    elif name and not msg.startswith(name):
        msg = f"{name}: {msg}"
    return {"loc": list(loc), "msg": msg, "type": error.get("type", "value_error")}


def validation_errors(errors: Iterable[dict[str, Any]], model: type[BaseModel] | None = None,
                      prefix: Loc = ()) -> list[dict[str, Any]]:
    """Pydantic errors made readable: each names its field and, for bounds, the allowed range.

    The offending input is never echoed whole (a 1 MB prompt would come back in the answer).
    """
    return [_explain(error, model, prefix) for error in errors]


def unprocessable(errors: list[dict[str, Any]]) -> JSONResponse:
    """A 422 answer in FastAPI's shape."""
    return JSONResponse({"detail": errors}, status_code=422)


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    for param in route.dependant.body_params:
        annotation = param.field_info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
    return None


class ApiRoute(APIRoute):
    """A route whose errors become clear JSON answers: 422 for bad input, 500 with a reason otherwise."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        body_model = _body_model(self)

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as error:
                return unprocessable(validation_errors(error.errors(), body_model))
            except ValidationError as error:  # an engine request or options object refused a value
                return unprocessable(validation_errors(error.errors(include_url=False), body_model, ("body",)))
            except ApiError as error:
                return unprocessable(error.errors)
            except ModelFileError as error:  # an unreadable, broken or unsafe model file the request chose
                return unprocessable(model_file_error(error, model_file_loc(error)).errors)
            except StateConflict as error:
                return JSONResponse({"error": error.kind, "detail": str(error)}, status_code=409)
            except RequestError as error:  # a name the request holds matched nothing when the job was planned
                return unprocessable([{"loc": ["body", error.field], "msg": str(error), "type": "value_error"}])
            except ScriptError as error:  # a script refused its arguments once it saw the whole request
                return unprocessable([{"loc": ["body", "script_args"], "msg": str(error), "type": "value_error"}])
            except LookupError as error:  # a model that was there when the job was queued is gone
                return unprocessable([{"loc": ["body"], "msg": str(error).strip("'\""), "type": "value_error"}])
            except QueueFull as error:
                return JSONResponse({"error": "QueueFull", "detail": str(error)}, status_code=503,
                                    headers={"Retry-After": str(error.retry_after)})
            except JobCancelled as error:
                return JSONResponse({"error": "JobCancelled", "detail": str(error)}, status_code=409)
            except EngineError as error:
                log.error("API job failed: %s", error)
                return JSONResponse({"error": type(error.__cause__ or error).__name__, "detail": str(error)},
                                    status_code=500)

        return handle
