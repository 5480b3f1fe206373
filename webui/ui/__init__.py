"""The Gradio web UI: one module per tab, shared pieces (top bar, prompts, controls, output) beside them.

:func:`mount_ui` builds the Blocks and mounts it on our FastAPI app (``webui.app`` serves that app);
:func:`build_ui` only builds the Blocks.
"""

from webui.ui.layout import build_ui
from webui.ui.mount import mount_ui, parse_auth

__all__ = ["build_ui", "mount_ui", "parse_auth"]
