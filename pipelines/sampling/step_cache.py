"""Opt-in step caching of the UNet (DeepCache, Ma et al. 2023): fewer full UNet calls, a slightly different image.

The deep part of the UNet changes little from one sampling step to the next. On a *full* call the whole UNet
runs and the feature map that enters its last up block (the output of ``up_blocks[-2]``) is kept; on the
``interval - 1`` *partial* calls that follow only the shallowest branch runs (``conv_in``, the time and
added-condition embeddings, ``down_blocks[0]``, ``up_blocks[-1]`` and the output layers), with the kept deep
features in place of everything below. The first and the last call of a run are always full, and so is a call
whose prompt embeddings or input shape differ from those the cache was made with (prompt editing), or where
ControlNet residuals start or stop.

ControlNet residuals: on a partial call only those of the skip connections the partial call runs (``conv_in``
and ``down_blocks[0]``'s layers) are added; the deeper ones and the middle one are already in the kept
features from the last full call. Down residuals without a middle one (T2I-adapter style) make every call full.

The partial call is written with diffusers' own sub-modules, in the order of
``UNet2DConditionModel.forward`` (diffusers, Apache-2.0), for the inputs our denoising loop passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from pipelines.models.acceleration import is_compiled

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

#: Intervals the option allows: 0 is off; 1 would make every call full (no gain).
INTERVALS = (0, 2, 3, 4, 5)

#: ``runner(index, sample, timestep, encoder_hidden_states, kwargs)`` -> the UNet's prediction; ``index`` is
#: the UNet call's position in this denoising run (0 .. calls - 1).
UnetRunner = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]

_PARTIAL_KWARGS = {"added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual"}


def unet_runner(unet: torch.nn.Module, interval: int, calls: int) -> UnetRunner:
    """How a denoising run of ``calls`` UNet calls calls the UNet: plainly when ``interval`` is 0 (or 1),
    else through a fresh :class:`StepCache` (a new one per run, so the hires pass starts its own cache)."""
    if interval > 1 and not supports_step_cache(unet):
        interval = 0
    if interval <= 1:
        return lambda index, sample, t, embeds, kwargs: unet(
            sample, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
    return StepCache(unet, interval, calls)


def supports_step_cache(unet: torch.nn.Module) -> bool:
    """True for a diffusers ``UNet2DConditionModel`` laid out as SD 1.x / 2.x / SDXL are, run eagerly."""
    config = getattr(unet, "config", None)
    if config is None or len(getattr(unet, "up_blocks", ())) < 2 or not hasattr(unet, "down_blocks"):
        return False
    if getattr(config, "addition_embed_type", None) == "image_hint":
        return False
    # A compiled UNet would not run the hook that keeps the deep features; stay exact and fast instead (the job
    # says so in its warnings).
    return not is_compiled(unet)


class StepCache:
    """Calls one UNet for one denoising run, full every ``interval`` calls and partial in between."""

    def __init__(self, unet: UNet2DConditionModel, interval: int, calls: int):
        if interval < 2:
            raise ValueError(f"step cache interval must be 2 or more, got {interval}")
        self.unet = unet
        self.interval = interval
        self.calls = calls
        #: The output of ``up_blocks[-2]`` from the last full call, and what it was made from.
        self.deep: torch.Tensor | None = None
        self._made_from: tuple | None = None
        self.full_calls = 0
        self.partial_calls = 0

    def __call__(self, index: int, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The UNet's prediction for this call (``return_dict=False`` output's first element)."""
        if self.needs_full(index, sample, encoder_hidden_states, kwargs):
            return self.full(sample, timestep, encoder_hidden_states, kwargs)
        return self.partial(sample, timestep, encoder_hidden_states, kwargs)

    def needs_full(self, index: int, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   kwargs: Mapping[str, Any]) -> bool:
        """Whether call ``index`` runs the whole UNet."""
        if self.deep is None or self._made_from is None or index % self.interval == 0 or index >= self.calls - 1:
            return True
        if set(kwargs) - _PARTIAL_KWARGS or _adapter_residuals(kwargs):
            return True  # inputs the partial call does not handle: stay exact
        embeds, rest = self._made_from
        return embeds is not encoder_hidden_states or rest != _made_from(sample, encoder_hidden_states, kwargs)[1]

    def full(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Run the whole UNet (through its own ``__call__``, so offload hooks still apply) and keep the
        features that enter its last up block."""
        kept: list[torch.Tensor] = []
        handle = self.unet.up_blocks[-2].register_forward_hook(lambda module, args, output: kept.append(output))
        try:
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                            **kwargs)[0]
        finally:
            handle.remove()
        self.deep = kept[-1]
        self._made_from = _made_from(sample, encoder_hidden_states, kwargs)
        self.full_calls += 1
        return out

    def partial(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Run only the shallowest branch, with the deep features of the last full call."""
        unet = self.unet
        emb, encoder_hidden_states = _embeddings(unet, sample, timestep, encoder_hidden_states,
                                                 kwargs.get("added_cond_kwargs"))
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        first = unet.down_blocks[0]
        last = unet.up_blocks[-1]
        sample = unet.conv_in(sample)
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            _, res = first(hidden_states=sample, temb=emb)
        # The last up block takes conv_in's output and the first down block's layer outputs (not its
        # downsampler's): the first len(last.resnets) skip connections of the full forward.
        skips = ((sample,) + tuple(res))[: len(last.resnets)]
        residuals = kwargs.get("down_block_additional_residuals")
        if residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, residuals[: len(skips)]))
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=self.deep, temb=emb, res_hidden_states_tuple=skips,
                       encoder_hidden_states=encoder_hidden_states)
        else:
            out = last(hidden_states=self.deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out:
            out = unet.conv_act(unet.conv_norm_out(out))
        self.partial_calls += 1
        return unet.conv_out(out)


def _made_from(sample: torch.Tensor, encoder_hidden_states: torch.Tensor, kwargs: Mapping[str, Any]) -> tuple:
    """What kept deep features depend on besides the timestep: a new prompt (prompt editing), another input
    shape, or ControlNet residuals starting or stopping (a guidance window) make the next call full."""
    return encoder_hidden_states, (tuple(sample.shape), "mid_block_additional_residual" in kwargs)


def _adapter_residuals(kwargs: Mapping[str, Any]) -> bool:
    # Down residuals without a middle one are T2I-adapter residuals inside the down blocks for diffusers,
    # which the partial call does not reproduce.
    # An IP-Adapter's image embeddings feed attention the partial call does not run either.
    if "image_embeds" in (kwargs.get("added_cond_kwargs") or {}):
        return True
    return "down_block_additional_residuals" in kwargs and kwargs.get("mid_block_additional_residual") is None


def _embeddings(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: Mapping[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The time (+ SDXL added-condition) embedding and the processed text states, as the UNet's forward
    computes them."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    class_emb = unet.get_class_embed(sample=sample, class_labels=None)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=dict(added_cond_kwargs or {}))
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=dict(added_cond_kwargs or {}))
    return emb, encoder_hidden_states
