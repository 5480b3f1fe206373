"""UI controls built from the engine's pydantic declarations: ranges, defaults and tooltips are declared once there."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

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
    """The field's default value; None for a required field (it has none)."""
    info = field_info(model, name)
    return None if info.is_required() else info.get_default(call_default_factory=True)


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


def number(model: type[BaseModel], name: str, label: str, *, value: Any = None, precision: int | None = 0,
           **kwargs: Any) -> gr.Number:
    """A number box bounded by the field's range (whole numbers unless ``precision`` is None)."""
    low, high = bounds(model, name)
    info = kwargs.pop("info", description(model, name))
    return gr.Number(label=label, minimum=low, maximum=high, precision=precision,
                     value=default(model, name) if value is None else value, info=info, **kwargs)


def checkbox(model: type[BaseModel], name: str, label: str, *, value: Any = None, **kwargs: Any) -> gr.Checkbox:
    return gr.Checkbox(label=label, value=default(model, name) if value is None else value,
                       info=description(model, name), **kwargs)


def dropdown(model: type[BaseModel], name: str, label: str, *, value: Any = None, **kwargs: Any) -> gr.Dropdown:
    """A dropdown of the values a ``Literal[...]`` field allows."""
    return gr.Dropdown(list(choices(model, name)), label=label, value=default(model, name) if value is None else value,
                       info=description(model, name), **kwargs)


def _optional(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def control(model: type[BaseModel], name: str, label: str, **kwargs: Any) -> gr.Component:
    """The control for any field, chosen by its type: a checkbox (bool), a dropdown (Literal), a number box
    (int: whole numbers; float), a text box (str; ``list[str]``: one item a line). Its value goes back into
    the model through :func:`value_for`."""
    annotation, optional = _optional(field_info(model, name).annotation)
    if annotation is bool:
        return checkbox(model, name, label, **kwargs)
    if get_origin(annotation) is Literal:
        return dropdown(model, name, label, **kwargs)
    if annotation in (int, float):
        if optional and _excludes_zero(model, name):  # see value_for: 0 stands for "none"
            kwargs.setdefault("info", f"{description(model, name)} (0: none)".lstrip())
        return number(model, name, label, precision=0 if annotation is int else None, **kwargs)
    if annotation is str or get_origin(annotation) is list:
        value = default(model, name)
        text = "\n".join(value) if isinstance(value, list) else (value or "")
        return gr.Textbox(text, label=label, info=description(model, name),
                          lines=3 if get_origin(annotation) is list else 1, **kwargs)
    raise TypeError(f"{model.__name__}.{name}: no control for a field of type {annotation!r}")


def value_for(model: type[BaseModel], name: str, value: Any) -> Any:
    """A control's value as the field takes it: "" is None for optional fields, lines are a list."""
    annotation, optional = _optional(field_info(model, name).annotation)
    if get_origin(annotation) is list:
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if optional and (value is None or value == ""):
        return None
    if optional and value == 0 and annotation in (int, float) and _excludes_zero(model, name):
        return None  # a cleared number box sends 0; where 0 is not allowed it means "none"
    return value


def _excludes_zero(model: type[BaseModel], name: str) -> bool:
    return any(isinstance(item, annotated_types.Gt) and item.gt >= 0  # type: ignore[operator]
               for item in field_info(model, name).metadata)


def control_value(model: type[BaseModel], name: str, value: Any) -> Any:
    """A field's value as its control shows it (the inverse of :func:`value_for`)."""
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)
    annotation, _ = _optional(field_info(model, name).annotation)
    if value is None and annotation is str:
        return ""
    return value
