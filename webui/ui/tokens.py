"""The live token counters under the prompts (``13/75``)."""

from __future__ import annotations

import threading

from pipelines.models.checkpoints import shipped_tokenizer
from pipelines.prompts.encoding import PromptEncoder, count_tokens
from webui.context import AppContext


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
        """The counter's text, e.g. ``13/75``; red when a new 75-token chunk has just begun."""
        used, limit = self.count(prompt or "", int(steps or 20))
        return f"<span class='sdui-token-counter'>{used}/{limit}</span>"
