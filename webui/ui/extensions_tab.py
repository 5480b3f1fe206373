"""The Extensions tab: the installed extensions and their state, turning them on or off for the next start
(the ``disabled_extensions`` option), and installing one from a git URL when the operator allows it."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from webui.context import AppContext
from webui.extensions import BUILTIN_DIR, ExtensionRecord, changes_refused, install_from_url, install_refused


def plugin_dir(ctx: AppContext) -> Path:
    """Where plug-ins live and are installed: --extensions-dir, else the app's extensions/ folder."""
    return Path(ctx.flags.extensions_dir) if ctx.flags.extensions_dir else BUILTIN_DIR


def _state(record: ExtensionRecord, saved_off: set[str]) -> tuple[str, str]:
    """(css class, text) of an extension's state now, and what the next start will do when that differs."""
    if record.error:
        state = ("failed", f"failed to load: {record.error}")
    elif record.loaded:
        state = ("enabled", "enabled")
    else:
        state = ("disabled", f"disabled ({record.disabled_by})" if record.disabled_by else "disabled")
    flag_or_folder = record.disabled_by and "Extensions tab" not in record.disabled_by
    if not flag_or_folder:
        if record.name in saved_off and state[0] != "disabled":
            return state[0], state[1] + "; disabled at the next start"
        if record.name not in saved_off and state[0] == "disabled":
            return state[0], state[1] + "; enabled at the next start"
    return state


def extension_table(ctx: AppContext) -> str:
    """The installed extensions as A1111's table: name, kind, state (with the load error), URL, branch, version."""
    saved_off = set(ctx.options.disabled_extensions)
    rows = []
    for record in ctx.extensions.records:
        css, text = _state(record, saved_off)
        remote = html.escape(record.remote) if record.remote else ("built-in" if record.builtin else "local folder")
        rows.append(
            f"<tr class='sdui-ext-{css}' data-extension='{html.escape(record.name)}'>"
            f"<td>{html.escape(record.name)}</td><td>{'built-in' if record.builtin else 'plug-in'}</td>"
            f"<td class='sdui-ext-state'>{html.escape(text)}</td><td>{remote}</td>"
            f"<td>{html.escape(record.branch)}</td><td>{html.escape(record.commit_hash[:8])}</td></tr>")
    body = "".join(rows) or "<tr><td colspan='6'>No extensions found.</td></tr>"
    return ("<div class='sdui-ext-table-wrap'><table id='extensions' class='sdui-ext-table'>"
            "<thead><tr><th>Extension</th><th>Kind</th><th>State</th>"
            "<th>URL</th><th>Branch</th><th>Version</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _names(ctx: AppContext) -> list[str]:
    return [record.name for record in ctx.extensions.records]


def _enabled_choice(ctx: AppContext) -> list[str]:
    """The names ticked: every extension not in ``disabled_extensions``."""
    saved_off = set(ctx.options.disabled_extensions)
    return [name for name in _names(ctx) if name not in saved_off]


def build_extensions_tab(ctx: AppContext) -> None:
    refused = changes_refused(ctx.flags)
    install_off = install_refused(ctx.flags)
    with gr.Tabs(elem_id="tabs_extensions"):
        with gr.Tab("Installed", id="installed", elem_id="extensions_installed_tab"):
            gr.Markdown("Untick an extension to turn it off. Changes are saved in config.json and take effect "
                        "when the server is **restarted** (stop it and start it again); nothing is unloaded from "
                        "the running server. `--disable-all-extensions` and `--disable-extra-extensions` still win.",
                        elem_id="extensions_help")
            enabled = gr.CheckboxGroup(_names(ctx), value=lambda: _enabled_choice(ctx), label="Enabled extensions",
                                       elem_id="extensions_enabled", interactive=refused is None)
            with gr.Row():
                apply = gr.Button("Apply (takes effect at restart)", variant="primary", elem_id="extensions_apply",
                                  interactive=refused is None, scale=0, min_width=340)
            status = gr.HTML(f"<p class='sdui-error'>{html.escape(refused)}.</p>" if refused else "",
                             elem_id="extensions_status")
            table = gr.HTML(lambda: extension_table(ctx), elem_id="extensions_table")
        with gr.Tab("Install from URL", id="install", elem_id="extensions_install_tab"):
            if install_off:
                gr.HTML(f"<p class='sdui-error' id='extensions_install_off'>Install from URL is off: "
                        f"{html.escape(install_off)}.</p>")
            url = gr.Textbox(label="URL for extension's git repository", elem_id="extension_to_install",
                             interactive=install_off is None, placeholder="https://github.com/owner/repository")
            branch = gr.Textbox(label="Specific branch name", placeholder="Leave empty for default main branch",
                                elem_id="extension_to_install_branch", interactive=install_off is None)
            dirname = gr.Textbox(label="Local directory name", placeholder="Leave empty for auto",
                                 elem_id="extension_to_install_dirname", interactive=install_off is None)
            install = gr.Button("Install", variant="primary", elem_id="extension_install",
                                interactive=install_off is None)
            result = gr.HTML("", elem_id="extension_install_result")

    def save(ticked: list[str]):
        problem = changes_refused(ctx.flags)
        if problem:
            raise gr.Error(problem)
        known = _names(ctx)
        unknown = [name for name in ticked or [] if name not in known]
        if unknown:
            raise gr.Error(f"disabled_extensions: unknown extension(s) {', '.join(unknown)}; known: "
                           f"{', '.join(known)}")
        off = [name for name in known if name not in (ticked or [])]
        # Names of extensions no longer installed stay in the list, as A1111 keeps them.
        kept = [name for name in ctx.options.disabled_extensions if name not in known]
        ctx.update_options({"disabled_extensions": kept + off})
        text = (f"Saved: {', '.join(off)} will be off" if off else "Saved: every extension will be on") + \
            ". Restart the server to apply."
        return f"<p id='extensions_saved'>{html.escape(text)}</p>", extension_table(ctx)

    apply.click(save, inputs=[enabled], outputs=[status, table], show_progress="hidden")

    def do_install(address: str, branch_name: str, folder: str):
        problem = install_refused(ctx.flags)
        if problem:
            raise gr.Error(problem)
        if not (address or "").strip():
            raise gr.Error("url: enter the URL of the extension's git repository")
        try:
            target = install_from_url(address, plugin_dir(ctx), dirname=folder or "", branch=branch_name or "",
                                      installed=ctx.extensions.records)
        except ValueError as error:
            return f"<p class='sdui-error'>{html.escape(str(error))}</p>"
        return (f"<p id='extension_installed'>Installed into {html.escape(str(target))}. Restart the server to load "
                "it.</p>")

    install.click(do_install, inputs=[url, branch, dirname], outputs=[result])
