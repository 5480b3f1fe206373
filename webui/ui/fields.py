"""UI controls built from the engine's pydantic declarations: ranges, defaults and tooltips are declared once there."""

from __future__ import annotations

from typing import Any, get_args

import annotated_types
import gradio as gr
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def field_info(model: type[BaseModel], name: str) -> FieldInfo:
    """The declaration of ``model.name``; KeyError names the field when it does not exist."""
    try:
        return model.model_fields[name]
    except KeyError:
        raise KeyError(f"{model.__name__} has no field {name!r}") from None


def bounds(model: type[BaseModel], name: str) -> tuple[float | None, float | None]:
    """The (minimum, maximum) a field accepts, from its ``ge``/``gt``/``le``/``lt`` constraints."""
    low = high = None
    for item in field_info(model, name).metadata:
        if isinstance(item, (annotated_types.Ge, annotated_types.Gt)):
            low = getattr(item, "ge", getattr(item, "gt", None))
        elif isinstance(item, (annotated_types.Le, annotated_types.Lt)):
            high = getattr(item, "le", getattr(item, "lt", None))
    return low, high


def default(model: type[BaseModel], name: str) -> Any:
    """The field's default value."""
    return field_info(model, name).get_default(call_default_factory=True)


def description(model: type[BaseModel], name: str) -> str:
    return field_info(model, name).description or ""


def choices(model: type[BaseModel], name: str) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` field allows."""
    return get_args(field_info(model, name).annotation)


def slider(model: type[BaseModel], name: str, label: str, *, step: float = 1, value: Any = None,
           minimum: float | None = None, maximum: float | None = None, **kwargs: Any) -> gr.Slider:
    """A slider over the field's declared range; ``minimum``/``maximum`` narrow it for comfort (never widen)."""
    low, high = bounds(model, name)
    if low is None or high is None:
        raise ValueError(f"{model.__name__}.{name} has no declared range for a slider")
    low = max(low, minimum) if minimum is not None else low
    high = min(high, maximum) if maximum is not None else high
    return gr.Slider(minimum=low, maximum=high, step=step, label=label,
                     value=default(model, name) if value is None else value,
                     info=description(model, name), **kwargs)


def number(model: type[BaseModel], name: str, label: str, *, value: Any = None, **kwargs: Any) -> gr.Number:
    """A number box bounded by the field's range."""
    low, high = bounds(model, name)
    return gr.Number(label=label, minimum=low, maximum=high, precision=0,
                     value=default(model, name) if value is None else value,
                     info=description(model, name), **kwargs)


def checkbox(model: type[BaseModel], name: str, label: str, *, value: Any = None, **kwargs: Any) -> gr.Checkbox:
    return gr.Checkbox(label=label, value=default(model, name) if value is None else value,
                       info=description(model, name), **kwargs)
