"""The LoRA browser under the prompt: a search box, a refresh button and one card per LoRA.

Clicking a card adds ``<lora:name:1>`` to the prompt (or takes it out again if the prompt has it). Cards are
a ``gr.Dataset`` in gallery layout: one clickable sample per LoRA, paged, built on the server without images.
"""

from __future__ import annotations

import html
import re

import gradio as gr

from webui.extension_api import TabUi

from .library import LoraFile, LoraLibrary

CARDS_PER_PAGE = 24


def card_facts(file: LoraFile) -> list[str]:
    """The short facts a card shows under the name: alias, base model, training resolution."""
    facts = []
    if file.alias != file.name:
        facts.append(f"alias {file.alias}")
    if file.base_model:
        facts.append(file.base_model)
    if file.resolution:
        facts.append(f"{file.resolution} px")
    return facts


def card_html(file: LoraFile) -> str:
    """One card: the name, then the facts (HTML-escaped)."""
    facts = " · ".join(html.escape(fact) for fact in card_facts(file))
    return (f"<div class='lora-card' title='{html.escape(str(file.path), quote=True)}'>"
            f"<b>{html.escape(file.name)}</b><br><small>{facts}</small></div>")


def matching(files: list[LoraFile], query: str) -> list[LoraFile]:
    """The files whose name, alias or base model contains every word of ``query`` (any case)."""
    words = query.lower().split()

    def text(file: LoraFile) -> str:
        return f"{file.name} {file.alias} {file.base_model or ''}".lower()

    return [file for file in files if all(word in text(file) for word in words)]


def toggle_tag(prompt: str, name: str) -> str:
    """``prompt`` with ``<lora:name:1>`` appended, or with every ``<lora:name:...>`` removed if it has one."""
    pattern = re.compile(rf"\s*<lora:{re.escape(name)}(?::[^>]*)?>")
    if pattern.search(prompt or ""):
        return pattern.sub("", prompt).strip()
    tag = f"<lora:{name}:1>"
    prompt = (prompt or "").rstrip()
    return f"{prompt} {tag}" if prompt else tag


def build_panel(library: LoraLibrary, tab_ui: TabUi) -> None:
    """The browser's Gradio content (built inside the accordion the UI opens for it)."""
    with gr.Row():
        search = gr.Textbox(placeholder="Search LoRAs", show_label=False, scale=4,
                            elem_id=f"{tab_ui.tab}_lora_search")
        refresh = gr.Button("Refresh", scale=1, elem_id=f"{tab_ui.tab}_lora_refresh")
    files = library.files()
    names = gr.State([file.name for file in files])
    cards = gr.Dataset(components=[gr.HTML(visible=False)], samples=[[card_html(f)] for f in files],
                       type="index", layout="gallery", samples_per_page=CARDS_PER_PAGE, label="LoRA",
                       show_label=False, elem_id=f"{tab_ui.tab}_lora_cards")

    def show(query: str, rescan: bool) -> tuple[gr.Dataset, list[str]]:
        found = matching(library.refresh() if rescan else library.files(), query or "")
        return gr.Dataset(samples=[[card_html(f)] for f in found]), [f.name for f in found]

    def insert(index: int | None, shown: list[str], prompt: str) -> str:
        if index is None or not 0 <= index < len(shown):
            return prompt
        return toggle_tag(prompt, shown[index])

    search.change(lambda query: show(query, False), inputs=search, outputs=[cards, names], show_progress="hidden")
    refresh.click(lambda query: show(query, True), inputs=search, outputs=[cards, names])
    cards.click(insert, inputs=[cards, names, tab_ui.prompt], outputs=tab_ui.prompt, show_progress="hidden")
