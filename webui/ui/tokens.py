"""The live token counters under the prompts (``13/75``)."""

from __future__ import annotations

import html as html_text
import threading

from pipelines.models.checkpoints import shipped_tokenizer
from pipelines.prompts.encoding import PromptEncoder, count_tokens
from pipelines.request import MAX_PROMPT_CHARS
from webui.context import AppContext

#: From this share of the request's prompt length limit on, the counter turns orange and says so.
NEAR_LIMIT = 0.9


class TokenCounter:
    """Counts with the loaded model's tokenizer(s), or with the shipped CLIP tokenizer when none is loaded."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self._fallback = None
        self._lock = threading.Lock()

    def _fallback_tokenizer(self):
        with self._lock:
            if self._fallback is None:
                self._fallback = shipped_tokenizer("sd1")
            return self._fallback

    def count(self, prompt: str, steps: int = 20) -> tuple[int, int]:
        """(tokens, limit) for ``prompt``."""
        model = self.ctx.engine.models.current
        if model is not None:
            counter = PromptEncoder.from_pipeline(model.pipe, embeddings=self.ctx.engine.embeddings)
        else:
            counter = self._fallback_tokenizer()
        return count_tokens(counter, prompt, steps)

    def html(self, prompt: str, steps: int = 20) -> str:
        """The counter's text, e.g. ``13/75``; orange with a note near the prompt length limit, red over it."""
        prompt = prompt or ""
        if len(prompt) > MAX_PROMPT_CHARS:
            note = (f"Too long: {len(prompt):,} characters, at most {MAX_PROMPT_CHARS:,}; "
                    "Generate will refuse this prompt.")
            return (f"<span class='sdui-token-counter sdui-token-over' title='{html_text.escape(note)}'>"
                    f"{len(prompt):,}/{MAX_PROMPT_CHARS:,} chars</span>"
                    f"<div class='sdui-token-note sdui-error'>{html_text.escape(note)}</div>")
        used, limit = self.count(prompt, int(steps or 20))
        counter = f"{used}/{limit}"
        if len(prompt) >= NEAR_LIMIT * MAX_PROMPT_CHARS:
            note = f"Near the limit: {len(prompt):,} of {MAX_PROMPT_CHARS:,} characters."
            return (f"<span class='sdui-token-counter sdui-token-near' title='{html_text.escape(note)}'>"
                    f"{counter}</span><div class='sdui-token-note'>{html_text.escape(note)}</div>")
        return f"<span class='sdui-token-counter'>{counter}</span>"
