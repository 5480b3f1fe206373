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
#: Options not shown here: the top bar's, and those another tab manages (the Extensions tab's list).
NOT_IN_SETTINGS = TOP_BAR_OPTIONS | {"disabled_extensions"}
#: Headings of the tab and the options under each (a name ending in "*" is a prefix). An option
#: no section names is shown under "Other", so a new option is never left out of the tab.
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Saving images", ("samples_save", "samples_format", "grid_save", "grid_format", "outdir_*")),
    ("Upscaling", ("upscaler_*",)),
    ("Face restoration", ("face_restoration*", "code_former_weight", "save_images_before_face_restoration")),
    ("Live previews", ("show_progress_*",)),
    ("Models and speed", ("sd_checkpoint_cache", "unet_compile", "fp8_storage", "step_cache_interval",
                          "default_model_url")),
    ("User interface", ("default_sampler",)),
)


def option_sections() -> list[tuple[str, list[str]]]:
    """Every option but the top bar's under its heading, in :data:`SECTIONS` order then declaration
    order; "Other" last."""
    names = [name for name in Options.model_fields if name not in NOT_IN_SETTINGS]
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
    if info.annotation is float:
        low, high = f.bounds(Options, name)
        if low is not None and high is not None:
            return gr.Slider(low, high, step=0.01, value=value, label=label, elem_id=elem_id)
        return gr.Number(value=value, label=label, elem_id=elem_id)
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


#: UI-default keys of the controls that start with the default_sampler setting; Apply of a new default
#: sampler drops them from ui-config.json, so the setting is what the next page load shows.
SAMPLER_DEFAULT_KEYS = ("txt2img/Sampling method/value", "img2img/Sampling method/value")


def current_values(ctx: AppContext, names: list[str]) -> dict[str, object]:
    """The saved values of ``names`` now (what a page load shows)."""
    options = ctx.options
    return {name: getattr(options, name) for name in names}


def settings_changes(names: list[str], loaded: dict[str, object], values: tuple) -> dict[str, object]:
    """The options the user changed on the page: compared with what the page was loaded with, not with the
    saved options, so that a page opened before another tab's Apply never writes its stale values back."""
    return {name: value for name, value in zip(names, values) if name in loaded and loaded[name] != value}


def build_settings(ctx: AppContext, defaults: UiDefaults, blocks: gr.Blocks) -> None:
    """A search box, one control per option, an Apply button, and a button that saves the current UI values
    as defaults. Every page load fills the controls from the saved options (not the start-up ones)."""
    current = ctx.options
    sections = option_sections()
    names = [name for _, section in sections for name in section]
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
        save_defaults = gr.Button("Save current UI values as defaults", elem_id="ui_defaults_submit")
    # Filtered in the browser (script.js): the settings whose label lacks the text are hidden.
    gr.Textbox(label="Search", placeholder="Search settings", elem_id="settings_search", max_lines=1)
    result = gr.HTML("", elem_id="settings_result")
    #: The values this page was loaded with (per browser tab): Apply saves only what differs from them.
    loaded = gr.State({})
    controls = []
    with gr.Column(elem_id="settings"):
        for title, section in sections:
            slug = title.lower().replace(" ", "_")
            with gr.Group(elem_id=f"settings_section_{slug}"):
                gr.Markdown(f"### {title}")
                controls += [option_control(name, getattr(current, name)) for name in section]

    def on_load():
        values = current_values(ctx, names)
        return [values, *values.values()]

    blocks.load(on_load, outputs=[loaded, *controls], show_progress="hidden", queue=False)

    def apply_settings(page: dict[str, object], *values: object):
        changes = {name: value for name, value in settings_changes(names, page, values).items()
                   if name not in OPERATOR_OPTIONS}
        if not changes:
            return "<p>Nothing changed.</p>", page
        try:
            ctx.update_options(changes)
        except KeyError as error:
            return f"<p class='sdui-error'>Not saved: {html.escape(str(error))}</p>", page
        except ValidationError as error:  # e.g. an output folder outside the allowed folders: nothing is saved
            reasons = "; ".join(_reason(item) for item in error.errors())
            return f"<p class='sdui-error'>Not saved: {html.escape(reasons)}</p>", page
        if "default_sampler" in changes:
            defaults.forget(SAMPLER_DEFAULT_KEYS)
        return (f"<p>{len(changes)} setting(s) changed and saved to {html.escape(str(ctx.options_path))}: "
                f"{html.escape(', '.join(changes))}.</p>", {**page, **changes})

    apply.click(apply_settings, inputs=[loaded, *controls], outputs=[result, loaded])

    keys = list(defaults.components)

    def save_ui_defaults(*values: object) -> str:
        defaults.save(dict(zip(keys, values)))
        return f"<p>UI defaults saved to {html.escape(str(defaults.path))}; they apply after a restart.</p>"

    save_defaults.click(save_ui_defaults, inputs=[defaults.components[k] for k in keys], outputs=[result])
