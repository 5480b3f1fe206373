"""Serving the UI: login, share link, TLS, the API beside it, and the ready message."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.route_utils import CustomCORSMiddleware

from webui.context import AppContext
from webui.cors import add_cors
from webui.flags import Flags
from webui.ui.layout import build_ui

log = logging.getLogger("webui.ui")
ASSETS = Path(__file__).resolve().parent


@dataclass
class RunningServer:
    """A started server: the Blocks, its FastAPI app and its URLs."""

    blocks: gr.Blocks
    app: object
    local_url: str
    share_url: str | None

    def close(self) -> None:
        """Stop serving."""
        self.blocks.close()


def parse_auth(flags: Flags) -> list[tuple[str, str]]:
    """Logins from --gradio-auth (``u:p,u2:p2``) and --gradio-auth-path (one or more per line)."""
    text = flags.gradio_auth or ""
    if flags.gradio_auth_path:
        text += "," + Path(flags.gradio_auth_path).read_text(encoding="utf-8").replace("\n", ",")
    logins = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user:
            raise ValueError("--gradio-auth: each login must look like user:password")
        logins.append((user, password))
    return logins


def start_server(ctx: AppContext, *, quiet: bool = False) -> RunningServer:
    """Build the UI and start serving it in the background; mount the API when --api is given."""
    flags = ctx.flags
    blocks = build_ui(ctx)
    blocks.queue()
    logins = parse_auth(flags)
    app, local_url, share_url = blocks.launch(
        server_name=flags.host,
        server_port=flags.server_port,
        share=flags.share,
        auth=logins or None,
        ssl_keyfile=flags.tls_keyfile,
        ssl_certfile=flags.tls_certfile,
        # A self-signed certificate is the usual case for a home server; gradio checks its own URL once.
        ssl_verify=False if flags.tls_certfile else True,
        inbrowser=flags.autolaunch,
        prevent_thread_lock=True,
        allowed_paths=[str(ctx.engine.paths.outputs_dir)],
        css=(ASSETS / "style.css").read_text(encoding="utf-8"),
        head=f"<script>{(ASSETS / 'script.js').read_text(encoding='utf-8')}</script>",
        ssr_mode=False,
        show_error=True,
        quiet=quiet,
    )
    if flags.share and not share_url:
        log.error("--share: could not open a Gradio share link (no network, or the share server cannot be "
                  "reached). The UI keeps serving locally at %s.", local_url)
    if flags.api:
        from webui.api.mount import mount_api  # written separately; imported only when the API is wanted

        mount_api(app, ctx)
    # Gradio's own CORS layer lets only local pages call a local server; --cors-allow-origins replaces it.
    add_cors(app, flags, replacing=(CustomCORSMiddleware,))
    return RunningServer(blocks, app, local_url, share_url)


def launch_ui(ctx: AppContext, started: float) -> int:
    """Serve the UI until interrupted; logs the URL, the device and the time to ready. Returns the exit code."""
    server = start_server(ctx)
    device = ctx.engine.models.device
    log.info("UI at %s%s; device %s, %s; ready in %.1f s", server.local_url,
             f" (public: {server.share_url})" if server.share_url else "", device.device,
             str(device.dtype).removeprefix("torch."), time.perf_counter() - started)
    try:
        server.blocks.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
