"""The Settings tab: every engine option (from :class:`Options`), saved to config.json; and UI defaults."""

from __future__ import annotations

import html
import typing

import gradio as gr
from pydantic import ValidationError

from pipelines.options import OPERATOR_OPTIONS, Options
from pipelines.sampling.samplers import SAMPLERS
from webui.context import AppContext
from webui.ui import fields as f
from webui.ui.ui_config import UiDefaults

#: Options whose choices come from elsewhere than their type.
_CHOICES = {"default_sampler": lambda: list(SAMPLERS)}
#: Options the top bar shows and saves (checkpoint, VAE, clip skip): a second control here would repeat
#: the top bar's elem_id and could disagree with it.
TOP_BAR_OPTIONS = frozenset({"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"})
#: Headings of the tab and the options under each (a name ending in "*" is a prefix). An option
#: no section names is shown under "Other", so a new option is never left out of the tab.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Saving images", ("samples_save", "samples_format", "grid_save", "grid_format", "outdir_*")),
    ("Upscaling", ("upscaler_*",)),
    ("Live previews", ("show_progress_*",)),
    ("Models and speed", ("sd_checkpoint_cache", "unet_compile", "step_cache_interval", "default_model_url")),
    ("User interface", ("default_sampler",)),
)


def option_sections() -> list[tuple[str, list[str]]]:
    """Every option but the top bar's under its heading, in :data:`SECTIONS` order then declaration
    order; "Other" last."""
    names = [name for name in Options.model_fields if name not in TOP_BAR_OPTIONS]
    taken: set[str] = set()
    sections = []
    for title, patterns in SECTIONS:
        chosen = [name for name in names if name not in taken and any(
            name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern for pattern in patterns)]
        taken.update(chosen)
        if chosen:
            sections.append((title, chosen))
    rest = [name for name in names if name not in taken]
    if rest:
        sections.append(("Other", rest))
    return sections


def option_control(name: str, value: object) -> gr.components.Component:
    """A control for one option, chosen by the option's type; its label is the option's description."""
    info = Options.model_fields[name]
    label = info.description or name
    elem_id = f"setting_{name}"
    if name in OPERATOR_OPTIONS:  # shown, never changed here (a flag or config.json on the server)
        return gr.Textbox(value=value, label=label, elem_id=elem_id, interactive=False)
    if name in _CHOICES:
        return gr.Dropdown(_CHOICES[name](), value=value, label=label, elem_id=elem_id)
    if typing.get_origin(info.annotation) is typing.Literal:
        return gr.Dropdown(list(f.choices(Options, name)), value=value, label=label, elem_id=elem_id)
    if info.annotation is bool:
        return gr.Checkbox(value=value, label=label, elem_id=elem_id)
    if info.annotation is int:
        low, high = f.bounds(Options, name)
        if low is not None and high is not None:
            return gr.Slider(low, high, step=1, value=value, label=label, elem_id=elem_id)
        return gr.Number(value=value, precision=0, label=label, elem_id=elem_id)
    return gr.Textbox(value=value, label=label, elem_id=elem_id)


def _reason(item: typing.Any) -> str:
    """One validation error as "option: what is wrong" (the option named once)."""
    name = ".".join(map(str, item["loc"]))
    message = str(item["msg"]).removeprefix("Value error, ")
    return message if not name or message.startswith(f"{name}:") or message.startswith(f"{name} ") \
        else f"{name}: {message}"


def build_settings(ctx: AppContext, defaults: UiDefaults) -> None:
    """One control per option, an Apply button, and a button that saves the current UI values as defaults."""
    current = ctx.options
    sections = option_sections()
    names = [name for _, section in sections for name in section]
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
        save_defaults = gr.Button("Save current UI values as defaults", elem_id="ui_defaults_submit")
    result = gr.HTML("", elem_id="settings_result")
    controls = []
    with gr.Column(elem_id="settings"):
        for title, section in sections:
            slug = title.lower().replace(" ", "_")
            with gr.Group(elem_id=f"settings_section_{slug}"):
                gr.Markdown(f"### {title}")
                controls += [option_control(name, getattr(current, name)) for name in section]

    def apply_settings(*values: object) -> str:
        old = ctx.options
        changes = {name: value for name, value in zip(names, values)
                   if getattr(old, name) != value and name not in OPERATOR_OPTIONS}
        if not changes:
            return "<p>Nothing changed.</p>"
        try:
            ctx.update_options(changes)
        except KeyError as error:
            return f"<p class='sdui-error'>Not saved: {html.escape(str(error))}</p>"
        except ValidationError as error:  # e.g. an output folder outside the allowed folders: nothing is saved
            reasons = "; ".join(_reason(item) for item in error.errors())
            return f"<p class='sdui-error'>Not saved: {html.escape(reasons)}</p>"
        return (f"<p>{len(changes)} setting(s) changed and saved to {html.escape(str(ctx.options_path))}: "
                f"{html.escape(', '.join(changes))}.</p>")

    apply.click(apply_settings, inputs=controls, outputs=[result])

    keys = list(defaults.components)

    def save_ui_defaults(*values: object) -> str:
        defaults.save(dict(zip(keys, values)))
        return f"<p>UI defaults saved to {html.escape(str(defaults.path))}; they apply after a restart.</p>"

    save_defaults.click(save_ui_defaults, inputs=[defaults.components[k] for k in keys], outputs=[result])
