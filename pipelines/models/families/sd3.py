"""SD 3 / 3.5: an MMDiT transformer, three text encoders (CLIP-L and CLIP-G with projections, T5-XXL optional), a
16-channel VAE, flow matching with a fixed shift.

Layouts, all offline: a diffusers folder (``StableDiffusion3Pipeline``); one file holding everything as published
(``model.diffusion_model.*`` original MMDiT keys, ``text_encoders.clip_l|clip_g|t5xxl.transformer.*``,
``first_stage_model.*``); and split files (the transformer alone, with ``clip_l``, ``clip_g``, optionally
``t5xxl`` and the VAE chosen as additional modules). Without T5 the pipeline runs on the CLIP encoders alone, as
diffusers does (T5's share of the context is zeros). Component configs are read off the weights over the shipped
configs in ``pipelines/models/configs/sd3/``; the transformer key conversion is diffusers' own.

Sampling is ``StableDiffusion3Pipeline``'s loop (flow-matching Euler, real CFG with the negative prompt) run step
by step, giving the same pixels with the same generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from pipelines.models.checkpoints import CONFIGS_DIR, TOKENIZER_FILES_DIR, ModelFamily, _read_json, read_state_dict
from pipelines.models.families import flux
from pipelines.models.families.base import Family
from pipelines.prompts.encoding import Conditioning, StepConditioning
from pipelines.prompts.parser import get_prompt_schedule

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
    parts = split_components(read_state_dict(path))
    sources = dict.fromkeys(parts, path)
    clips: list[tuple[dict[str, torch.Tensor], Path]] = []
    for module in modules:
        kind, weights = _module_parts(Path(module))
        if kind == "clip":
            clips.append((weights, Path(module)))
        else:
            parts[kind], sources[kind] = weights, Path(module)
    # Two CLIP files: the narrower is CLIP-L (768 wide against CLIP-G's 1280).
    for (weights, module), kind in zip(sorted(clips, key=lambda item: _width(item[0])),
                                       ("clip_l", "clip_g") if len(clips) > 1 else
                                       ("clip_g" if parts["clip_l"] else "clip_l",)):
        parts[kind], sources[kind] = weights, module
    if _SD3_KEY not in parts["transformer"]:
        raise ValueError(f"{path}: no SD 3.5 transformer weights ({_SD3_KEY})")
    for component in ("clip_l", "clip_g", "vae"):
        if not parts[component]:
            what, example, kind = _MESSAGES[component]
            folders = ", ".join(str(folder) for folder in search.get(kind, ())) or f"models/{kind}"
            raise ValueError(f"{path} is an SD 3.5 model without its {what}: put a file like {example} into "
                             f"{folders} and choose it in the top bar's \"VAE / Text Encoder\" list "
                             "(request field additional_modules)")
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
    path = Path(path)
    if path.is_dir():
        pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        return pipe, ModelFamily("sd3", False, "flow", path)
    return _load_file(path, torch_dtype=torch_dtype, cache_dir=cache_dir, modules=modules, search=search)


def encode(model, prompts: list[str], negative_prompts: list[str], steps: int, request) -> tuple[Conditioning,
                                                                                                    list[str]]:
    """Per-step conditioning (CLIP-L + CLIP-G + T5 context, the two pooled outputs); prompt editing works,
    emphasis and BREAK do not (a warning says so)."""
    pipe = model.pipe
    device = pipe._execution_device  # under --medvram / --lowvram the offload hooks' device, not the weights'
    prompt_schedules = [get_prompt_schedule(prompt, steps) for prompt in prompts]
    negative_schedules = [get_prompt_schedule(prompt, steps) for prompt in negative_prompts]
    warnings: list[str] = []
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encoding(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if text not in encoded:
            plain, changed = flux._plain_text(text)
            if changed and not warnings:
                warnings.append("SD 3.5: emphasis weights and BREAK are ignored; prompt editing works")
            embeds, _, pooled, _ = pipe.encode_prompt(plain, plain, plain, device=device,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=MAX_SEQUENCE_LENGTH)
            encoded[text] = (embeds, pooled)
        return encoded[text]

    starts: list[int] = []
    segments: list[StepConditioning] = []
    changes = sorted({0} | {end for schedule in prompt_schedules + negative_schedules for end, _ in schedule[:-1]})
    for start in changes:
        cond = [encoding(flux._text_at(schedule, start + 1)) for schedule in prompt_schedules]
        uncond = [encoding(flux._text_at(schedule, start + 1)) for schedule in negative_schedules]
        starts.append(start)
        segments.append(StepConditioning(
            cond=torch.cat([embeds for embeds, _ in cond]), uncond=torch.cat([embeds for embeds, _ in uncond]),
            pooled=torch.cat([pooled for _, pooled in cond]),
            uncond_pooled=torch.cat([pooled for _, pooled in uncond])))
    return Conditioning(starts, segments, prompt_schedules, negative_schedules, []), warnings


def sample(model, noise: torch.Tensor, conditioning: Conditioning, request,
           on_step: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """Denoise ``noise`` (B, 16, h, w) in ``request.steps`` flow-matching Euler steps with real CFG."""
    transformer = model.pipe.transformer
    device, dtype = model.pipe._execution_device, transformer.dtype  # as in encode()
    latents = noise.to(device=device, dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(request.steps, device=device)
    scheduler.set_begin_index(0)
    use_cfg = request.cfg_scale > 1.0
    for i, t in enumerate(scheduler.timesteps):
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
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
    return latents


FAMILY = Family(
    name="sd3",
    label="SD 3.5",
    claims_keys=_claims,
    folder_classes=("StableDiffusion3Pipeline",),
    config_dir=CONFIG_DIR,
    load=load,
    encode=encode,
    sample=sample,
    samplers=("Euler",),
    schedules=("Simple",),
    defaults={"sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 4.5},
    unet=False,
)
