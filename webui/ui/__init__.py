"""The Gradio web UI: one module per tab, shared pieces (top bar, prompts, controls, output) beside them.

:func:`launch_ui` is what ``webui.app.serve`` calls; :func:`start_server` starts it without blocking
(for tests); :func:`build_ui` only builds the Blocks.
"""

from webui.ui.layout import build_ui
from webui.ui.server import RunningServer, launch_ui, parse_auth, start_server

__all__ = ["RunningServer", "build_ui", "launch_ui", "parse_auth", "start_server"]
