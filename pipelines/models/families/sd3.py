"""SD 3 / 3.5: an MMDiT transformer, three text encoders (CLIP-L and CLIP-G with projections, T5-XXL optional), a
16-channel VAE, flow matching with a fixed shift.

Layouts, all offline: a diffusers folder (``StableDiffusion3Pipeline``); one file holding everything as published
(``model.diffusion_model.*`` original MMDiT keys, ``text_encoders.clip_l|clip_g|t5xxl.transformer.*``,
``first_stage_model.*``); and split files (the transformer alone, with ``clip_l``, ``clip_g``, optionally
``t5xxl`` and the VAE chosen as additional modules). Without T5 the pipeline runs on the CLIP encoders alone, as
diffusers does (T5's share of the context is zeros). Component configs are read off the weights over the shipped
configs in ``pipelines/models/configs/sd3/``; the transformer key conversion is diffusers' own.

Prompts: the CLIP part takes our prompt language as SDXL's encoders do (emphasis, BREAK, chunks past 75 tokens,
clip skip); T5 reads the plain text. A plain prompt of up to 75 tokens gives diffusers' conditioning exactly.

Sampling is ``StableDiffusion3Pipeline``'s loop (the flow-matching samplers of
``pipelines/sampling/flow_schedulers.py``, real CFG with the negative prompt) run step by step, giving the same
pixels with the same generators.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.models import lora_layouts
from pipelines.models.checkpoints import CONFIGS_DIR, TOKENIZER_FILES_DIR, ModelFamily, _read_json, read_state_dict
from pipelines.models.families import flux, split_files
from pipelines.models.families.base import Family
from pipelines.prompts.encoding import Conditioning, PromptEncoder, build_conditioning, text_at
from pipelines.sampling.flow_img2img import FlowStart
from pipelines.sampling.flow_schedulers import FLOW_SAMPLER_NAMES, FLOW_SCHEDULES, fitting_flow_schedule, flow_scheduler

if TYPE_CHECKING:
    from pipelines.sampling.img2img import SourceLatents

CONFIG_DIR = CONFIGS_DIR / "sd3"
#: T5 tokens per prompt, as diffusers' StableDiffusion3Pipeline uses by default.
MAX_SEQUENCE_LENGTH = 256
_SD3_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
_PREFIXES = {"text_encoders.clip_l.transformer.": "clip_l", "text_encoders.clip_g.transformer.": "clip_g",
             "text_encoders.t5xxl.transformer.": "t5xxl", "first_stage_model.": "vae", "vae.": "vae",
             "model.diffusion_model.": "transformer"}
_MESSAGES = {"clip_l": ("CLIP-L text encoder", "clip_l.safetensors", "text_encoder"),
             "clip_g": ("CLIP-G text encoder", "clip_g.safetensors", "text_encoder"),
             "vae": ("VAE", "the SD 3.5 VAE (diffusion_pytorch_model.safetensors of its vae folder)", "vae")}


def _claims(keys: Collection[str]) -> bool:
    return _SD3_KEY in keys or "model.diffusion_model." + _SD3_KEY in keys


def split_components(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "clip_l": {}, "clip_g": {}, "t5xxl": {},
                                                 "vae": {}}
    for key, value in state_dict.items():
        prefix = next((prefix for prefix in _PREFIXES if key.startswith(prefix)), None)
        if prefix is not None:
            parts[_PREFIXES[prefix]][key[len(prefix):]] = value
        else:
            parts["transformer"][key] = value
    return parts


def _module_parts(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, weights) of a separate module file: ``clip`` (L or G, told apart later), ``t5xxl`` or ``vae``."""
    weights = read_state_dict(path)
    for prefix, kind in _PREFIXES.items():
        if kind != "transformer" and any(key.startswith(prefix) for key in weights):
            weights = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
            return ("clip" if kind.startswith("clip") else kind), weights
    found = flux.module_kind(list(weights))
    if found is None:
        raise ValueError(f"{path} is none of an SD 3.5 model's modules (CLIP-L, CLIP-G, T5-XXL text encoder, VAE)")
    return ("clip" if found == "clip_l" else found), weights


def _width(weights: dict[str, torch.Tensor]) -> int:
    key = next(key for key in weights if key.endswith("embeddings.token_embedding.weight"))
    return weights[key].shape[1]


def transformer_config(weights: dict[str, torch.Tensor]) -> dict:
    hidden, in_channels, patch, _ = weights["x_embedder.proj.weight"].shape
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in weights
    head_dim = weights["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else 64
    return {
        **_read_json(CONFIG_DIR / "transformer_config.json"),
        "num_layers": flux._count(weights, "joint_blocks."), "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim, "in_channels": in_channels, "patch_size": patch,
        "out_channels": weights["final_layer.linear.weight"].shape[0] // (patch * patch),
        "joint_attention_dim": weights["context_embedder.weight"].shape[1],
        "caption_projection_dim": weights["context_embedder.weight"].shape[0],
        "pooled_projection_dim": weights["y_embedder.mlp.0.weight"].shape[1],
        "pos_embed_max_size": math.isqrt(weights["pos_embed"].shape[1]),
        "dual_attention_layers": sorted({int(key.split(".")[1]) for key in weights
                                         if key.startswith("joint_blocks.") and ".attn2." in key}),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def _load_transformer(weights: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> SD3Transformer2DModel:
    weights = flux._cast(weights, dtype)
    config = transformer_config(weights)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(weights))
    with init_empty_weights():
        model = SD3Transformer2DModel.from_config(config)
    flux._assign(model, converted, "transformer", path)
    return model.eval()


def _tokenizer(pad: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_FILES_DIR, local_files_only=True, model_max_length=77,
                                         pad_token=pad)


def _load_file(path: Path, *, torch_dtype: torch.dtype, cache_dir: Path, modules: Sequence[Path] = (),
               search: dict[str, Sequence[Path]] | None = None) -> tuple[StableDiffusion3Pipeline, ModelFamily]:
    search = search or {}
    parts, sources, clips = split_files.read_components(path, modules, split_components, _module_parts)
    # Two CLIP files: the narrower is CLIP-L (768 wide against CLIP-G's 1280).
    for (_, weights, module), kind in zip(sorted(clips, key=lambda item: _width(item[1])),
                                          ("clip_l", "clip_g") if len(clips) > 1 else
                                          ("clip_g" if parts["clip_l"] else "clip_l",)):
        parts[kind], sources[kind] = weights, module
    split_files.require_components(parts, path, label="SD 3.5", article="an", transformer_key=_SD3_KEY,
                                   required=_MESSAGES, search=search)
    has_t5 = bool(parts["t5xxl"])
    pipe = StableDiffusion3Pipeline(
        transformer=_load_transformer(parts["transformer"], torch_dtype, path),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_read_json(CONFIG_DIR / "scheduler.json")),
        vae=flux.load_vae(parts["vae"], torch_dtype, sources["vae"], Path(cache_dir), CONFIG_DIR / "vae_config.json"),
        text_encoder=flux.load_clip(parts["clip_l"], torch_dtype, sources["clip_l"], cls=CLIPTextModelWithProjection),
        tokenizer=_tokenizer("<|endoftext|>"),
        text_encoder_2=flux.load_clip(parts["clip_g"], torch_dtype, sources["clip_g"], cls=CLIPTextModelWithProjection,
                                      base=CONFIG_DIR / "clip_g_config.json", component="clip_g"),
        tokenizer_2=_tokenizer("!"),
        text_encoder_3=(t5 := flux.load_t5(parts["t5xxl"], torch_dtype, sources["t5xxl"])) if has_t5 else None,
        tokenizer_3=flux.t5_tokenizer(search.get("text_encoder", ()), t5, sources["t5xxl"]) if has_t5 else None,
    )
    return pipe, ModelFamily("sd3", False, "flow", CONFIG_DIR)


def load(path: Path, *, torch_dtype: torch.dtype, cache_dir: Path, modules: Sequence[Path] = (),
         search: dict[str, Sequence[Path]] | None = None) -> tuple[StableDiffusion3Pipeline, ModelFamily]:
    """An SD 3.5 model from a diffusers folder, one file, or a transformer file plus ``modules``."""
    return split_files.load_folder_or_file(path, StableDiffusion3Pipeline, "sd3", _load_file,
                                           torch_dtype=torch_dtype, cache_dir=cache_dir, modules=modules,
                                           search=search)


def encode(model, prompts: list[str], negative_prompts: list[str], steps: int, request) -> tuple[Conditioning,
                                                                                                    list[str]]:
    """Per-step conditioning as ``StableDiffusion3Pipeline`` builds it (CLIP-L and CLIP-G penultimate states side
    by side, padded to T5's width, then T5's tokens; the two pooled outputs), with our prompt language on the
    CLIP part: emphasis, BREAK, prompts beyond 75 tokens (more CLIP chunks), clip skip; prompt editing everywhere.
    T5 reads the plain text (a warning says so when a prompt has weights or BREAK)."""
    pipe = model.pipe
    clip = build_conditioning(PromptEncoder.from_pipeline(pipe), prompts, negative_prompts, steps,
                              request.clip_skip)
    device = pipe._execution_device  # under --medvram / --lowvram the offload hooks' device, not the weights'
    warnings: list[str] = []
    t5: dict[str, torch.Tensor] = {}

    def t5_embeds(text: str) -> torch.Tensor:
        if text not in t5:
            plain, changed = flux._plain_text(text)
            if changed and pipe.text_encoder_3 is not None and not warnings:
                warnings.append("SD 3.5: emphasis and BREAK shape the CLIP-L / CLIP-G part of the prompt; T5 reads "
                                "the plain text")
            t5[text] = _t5_embeds(pipe, plain, device)
        return t5[text]

    segments = []
    for start, segment in zip(clip.starts, clip.segments, strict=True):
        cond_t5 = torch.cat([t5_embeds(text_at(schedule, start + 1)) for schedule in clip.prompt_schedules])
        uncond_t5 = torch.cat([t5_embeds(text_at(schedule, start + 1))
                               for schedule in clip.negative_schedules])
        segments.append(dataclasses.replace(segment, cond=_joint_context(segment.cond, cond_t5),
                                            uncond=_joint_context(segment.uncond, uncond_t5)))
    return dataclasses.replace(clip, segments=segments), warnings


def _t5_embeds(pipe: StableDiffusion3Pipeline, text: str, device: torch.device) -> torch.Tensor:
    """T5's last hidden states for ``text`` (1, 256, 4096), or zeros of that shape without T5 (as diffusers)."""
    if pipe.text_encoder_3 is None:
        return torch.zeros(1, MAX_SEQUENCE_LENGTH, pipe.transformer.config.joint_attention_dim, device=device,
                           dtype=pipe.text_encoder.dtype)
    ids = pipe.tokenizer_3(text, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
    return pipe.text_encoder_3(ids.to(device))[0]


def _joint_context(clip: torch.Tensor, t5: torch.Tensor) -> torch.Tensor:
    """The MMDiT's context: the CLIP tokens zero-padded to T5's width, then T5's tokens."""
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip.to(t5.dtype), t5], dim=-2)


def sample(model, noise: torch.Tensor, conditioning: Conditioning, request,
           on_step: Callable[[int, torch.Tensor], None], source: SourceLatents | None = None) -> torch.Tensor:
    """Denoise ``noise`` (B, 16, h, w) in ``request.steps`` steps of the request's flow-matching sampler with real
    CFG. With ``source`` (img2img, inpaint, the hires pass) only the steps ``request.denoising_strength`` leaves
    run (:class:`~pipelines.sampling.flow_img2img.FlowStart`)."""
    transformer = model.pipe.transformer
    device, dtype = model.pipe._execution_device, transformer.dtype  # as in encode()
    noise = noise.to(device=device, dtype=dtype)
    tokens = noise.shape[-2] * noise.shape[-1] // transformer.config.patch_size ** 2
    scheduler, timesteps = flow_scheduler(request.sampler_name, request.scheduler, model.scheduler_config,
                                          shift=request.shift, image_seq_len=tokens, steps=request.steps,
                                          device=device)
    start = FlowStart(scheduler, timesteps, noise, source, request.denoising_strength)
    latents = start.latents
    use_cfg = request.cfg_scale > 1.0
    for i, t in enumerate(start.timesteps):
        flux._report(on_step, i, latents)
        cond = conditioning.at_step(i)
        if cond.pooled is None or cond.uncond_pooled is None:
            raise ValueError("SD 3.5 conditioning needs the pooled CLIP embeddings")
        embeds = torch.cat([cond.uncond, cond.cond]) if use_cfg else cond.cond
        pooled = torch.cat([cond.uncond_pooled, cond.pooled]) if use_cfg else cond.pooled
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        prediction = transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                 encoder_hidden_states=embeds.to(device, dtype),
                                 pooled_projections=pooled.to(device, dtype), return_dict=False)[0]
        if use_cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + request.cfg_scale * (text - uncond)
        latents = start.keep_unmasked(scheduler.step(prediction, t, latents, return_dict=False)[0], i)
    return latents


# --------------------------------------------------------------------------- LoRA files in the original layout


def _context_pre_only(rows: int, columns: int) -> bool:
    # The last block's context modulation gives (shift, scale) only: diffusers keeps it as (scale, shift).
    return rows == 2 * columns


#: Original joint-block module names (``.`` as ``_``, after ``joint_blocks_<i>_``) -> diffusers modules in the block.
_LORA_BLOCK_MODULES = {
    "x_block_attn_qkv": lora_layouts.Target(("attn.to_q", "attn.to_k", "attn.to_v")),
    "x_block_attn_proj": lora_layouts.Target(("attn.to_out.0",)),
    "x_block_attn2_qkv": lora_layouts.Target(("attn2.to_q", "attn2.to_k", "attn2.to_v")),
    "x_block_attn2_proj": lora_layouts.Target(("attn2.to_out.0",)),
    "x_block_mlp_fc1": lora_layouts.Target(("ff.net.0.proj",)),
    "x_block_mlp_fc2": lora_layouts.Target(("ff.net.2",)),
    "x_block_adaLN_modulation_1": lora_layouts.Target(("norm1.linear",)),
    "context_block_attn_qkv": lora_layouts.Target(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "context_block_attn_proj": lora_layouts.Target(("attn.to_add_out",)),
    "context_block_mlp_fc1": lora_layouts.Target(("ff_context.net.0.proj",)),
    "context_block_mlp_fc2": lora_layouts.Target(("ff_context.net.2",)),
    "context_block_adaLN_modulation_1": lora_layouts.Target(("norm1_context.linear",), swap=_context_pre_only),
}
#: The modules outside the joint blocks (kohya's optional "emb_dims" ones).
_LORA_TOP_MODULES = {
    "context_embedder": lora_layouts.Target(("transformer.context_embedder",)),
    "t_embedder_mlp_0": lora_layouts.Target(("transformer.time_text_embed.timestep_embedder.linear_1",)),
    "t_embedder_mlp_2": lora_layouts.Target(("transformer.time_text_embed.timestep_embedder.linear_2",)),
    "y_embedder_mlp_0": lora_layouts.Target(("transformer.time_text_embed.text_embedder.linear_1",)),
    "y_embedder_mlp_2": lora_layouts.Target(("transformer.time_text_embed.text_embedder.linear_2",)),
    "x_embedder_proj": lora_layouts.Target(("transformer.pos_embed.proj",)),
    "final_layer_linear": lora_layouts.Target(("transformer.proj_out",)),
    "final_layer_adaLN_modulation_1": lora_layouts.Target(("transformer.norm_out.linear",), swap=True),
}
_LORA_TRANSFORMER_PREFIXES = ("lora_unet_", "model.diffusion_model.", "diffusion_model.", "")
_LORA_TEXT_ENCODERS = {"lora_te1_": "text_encoder", "text_encoders.clip_l.transformer.": "text_encoder",
                       "lora_te2_": "text_encoder_2", "text_encoders.clip_g.transformer.": "text_encoder_2"}
_LORA_T5_PREFIXES = ("lora_te3_", "text_encoders.t5xxl.transformer.")


def _lora_target(stem: str) -> lora_layouts.Target | None:
    """The diffusers module(s) of one LoRA module named after the original MMDiT layout (kohya, ComfyUI)."""
    encoder = lora_layouts.clip_target(stem, _LORA_TEXT_ENCODERS)
    if encoder is not None:
        return encoder
    name = lora_layouts.underscored(stem, _LORA_TRANSFORMER_PREFIXES) or ""
    block = re.fullmatch(r"joint_blocks_(\d+)_(.+)", name)
    if block is None:
        return _LORA_TOP_MODULES.get(name)
    target = _LORA_BLOCK_MODULES.get(block[2])
    return None if target is None else target.within(f"transformer.transformer_blocks.{block[1]}.")


def lora_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD 3.5 LoRA in the layout diffusers' loader reads: kohya sd-scripts keys (``lora_unet_joint_blocks_0_x_block_
    attn_qkv`` ..., ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G) and ComfyUI ones (``diffusion_model.joint_blocks.0...``)
    converted, which diffusers does not read; T5 modules are left out (the pipeline loads no LoRA into T5). Other
    layouts (diffusers / peft) are returned as they are."""
    return lora_layouts.to_peft(state_dict, _lora_target, ignored=_LORA_T5_PREFIXES)


FAMILY = Family(
    name="sd3",
    label="SD 3.5",
    claims_keys=_claims,
    folder_classes=("StableDiffusion3Pipeline",),
    config_dir=CONFIG_DIR,
    load=load,
    encode=encode,
    sample=sample,
    samplers=FLOW_SAMPLER_NAMES,
    schedules=FLOW_SCHEDULES,
    fitting_schedule=fitting_flow_schedule,
    defaults={"sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 4.5},
    lora_keys=lora_keys,
    unet=False,
)
