"""Flux.1 (dev and schnell): a flow-matching transformer, CLIP-L (pooled) + T5-XXL text encoders, a 16-channel VAE.

Layouts read, all offline:

- a diffusers folder (``model_index.json`` of ``FluxPipeline``);
- one file holding everything, keys of the original (Black Forest Labs) layout as the published single files
  have them: ``model.diffusion_model.*`` (the transformer), ``text_encoders.clip_l.transformer.*``,
  ``text_encoders.t5xxl.transformer.*``, ``vae.*`` (or ``first_stage_model.*``);
- split files: a transformer-only file (bare original keys) in ``models/Stable-diffusion/`` or ``models/unet/``,
  with the text encoders and the VAE chosen as "additional modules" (Forge's "VAE / Text Encoder" list) from
  ``models/text_encoder/`` and ``models/VAE/``.

Every component's config is read off its weights (layer counts, widths, heads) on top of the shipped configs in
``pipelines/models/configs/flux/``; dev and schnell differ by the guidance embedder (dev has one). Weights stored
as fp8 (e4m3fn / e5m2) or bf16 are cast to the engine's dtype on the CPU while loading.

Sampling is diffusers' ``FluxPipeline`` loop (packed 2x2 latents, resolution-dependent shift for dev unless the
request sets ``shift``; the samplers of ``pipelines/sampling/flow_schedulers.py``) run step by step so that
interrupt, progress and prompt editing work; with the same generators it gives the same pixels as ``FluxPipeline``.
Dev's distilled guidance is the request's ``distilled_cfg_scale`` (infotext "Distilled CFG Scale"); real CFG with
the negative prompt runs only when ``cfg_scale`` > 1 (the family's default is 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from pipelines.job_control import JobStopped
from pipelines.models import lora_layouts
from pipelines.models.checkpoints import (
    CONFIGS_DIR,
    TOKENIZER_FILES_DIR,
    ModelFamily,
    _materialize,
    _read_json,
    _require_complete,
    read_state_dict,
)
from pipelines.models.families import split_files
from pipelines.models.families.base import Family
from pipelines.models.weights import read_safetensors_header
from pipelines.prompts.encoding import Conditioning, StepConditioning, text_at
from pipelines.prompts.parser import BREAK_MARKER, get_prompt_schedule, parse_prompt_attention
from pipelines.sampling.flow_img2img import FlowStart
from pipelines.sampling.flow_schedulers import FLOW_SAMPLER_NAMES, FLOW_SCHEDULES, fitting_flow_schedule, flow_scheduler

if TYPE_CHECKING:
    from pipelines.sampling.img2img import SourceLatents

CONFIG_DIR = CONFIGS_DIR / "flux"
#: Where the T5 tokenizer files (``tokenizer.json`` or ``spiece.model``) are looked for, in this order: the users'
#: ``<models/text_encoder>/t5_tokenizer/``, then the one shipped beside the configs (google/t5-v1_1-xxl's).
T5_TOKENIZER_DIR = "t5_tokenizer"
#: T5 tokens per prompt, as diffusers' FluxPipeline uses by default.
MAX_SEQUENCE_LENGTH = 512

_FLUX_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
_TRANSFORMER_PREFIX = "model.diffusion_model."
_CLIP_PREFIX = "text_encoders.clip_l.transformer."
_T5_PREFIX = "text_encoders.t5xxl.transformer."
_VAE_PREFIXES = ("vae.", "first_stage_model.")
#: A component's name, what it is called in messages, and the file users keep it in.
_COMPONENTS = {
    "clip_l": ("CLIP-L text encoder", "clip_l.safetensors", "text_encoder"),
    "t5xxl": ("T5-XXL text encoder", "t5xxl_fp16.safetensors", "text_encoder"),
    "vae": ("VAE", "ae.safetensors", "vae"),
}
_CAST_FROM = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.float32)


def _claims(keys: Collection[str]) -> bool:
    return _FLUX_KEY in keys or _TRANSFORMER_PREFIX + _FLUX_KEY in keys


# --------------------------------------------------------------------------- splitting and identifying weights


def split_components(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of one file by component (``transformer``, ``clip_l``, ``t5xxl``, ``vae``), prefixes removed."""
    parts: dict[str, dict[str, torch.Tensor]] = {"transformer": {}, "clip_l": {}, "t5xxl": {}, "vae": {}}
    for key, value in state_dict.items():
        if key.startswith(_CLIP_PREFIX):
            parts["clip_l"][key[len(_CLIP_PREFIX):]] = value
        elif key.startswith(_T5_PREFIX):
            parts["t5xxl"][key[len(_T5_PREFIX):]] = value
        elif key.startswith(_VAE_PREFIXES):
            parts["vae"][key.split(".", 1)[1]] = value
        elif key.startswith(_TRANSFORMER_PREFIX):
            parts["transformer"][key[len(_TRANSFORMER_PREFIX):]] = value
        else:
            parts[_kind_of_key(key) or "transformer"][key] = value
    return parts


def _kind_of_key(key: str) -> str | None:
    if key.startswith(("text_model.", "embeddings.token_embedding", "embeddings.position_embedding",
                       "encoder.layers.", "final_layer_norm.")):
        return "clip_l"
    if key.startswith(("encoder.block.", "shared.", "encoder.final_layer_norm", "encoder.embed_tokens")):
        return "t5xxl"
    if key.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")):
        return "vae"
    return None


def module_kind(keys: Collection[str]) -> str | None:
    """What a separate module file holds: ``clip_l``, ``t5xxl``, ``vae``, or None (none of them)."""
    stripped = [key.split("transformer.", 1)[1] if key.startswith("text_encoders.") else key for key in keys]
    if any(key.startswith("encoder.block.0.layer.0.SelfAttention") for key in stripped):
        return "t5xxl"
    if any(key.startswith(("text_model.encoder.layers.0.", "encoder.layers.0.self_attn")) for key in stripped):
        return "clip_l"
    if any(key.endswith("decoder.conv_in.weight") for key in stripped):
        return "vae"
    return None


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors (fp8 and bf16 included) in ``dtype``, converted on the CPU."""
    return {key: value.to(dtype) if value.dtype in _CAST_FROM else value for key, value in state_dict.items()}


def _count(keys: Collection[str], prefix: str) -> int:
    numbers = {int(match.group(1)) for key in keys if (match := re.match(re.escape(prefix) + r"(\d+)\.", key))}
    return max(numbers) + 1 if numbers else 0


# --------------------------------------------------------------------------- configs read off the weights


def rope_axes(head_dim: int) -> list[int]:
    """The rotary embedding's split of one head over (text index, height, width): [16, 56, 56] for 128."""
    side = (head_dim * 7 // 16) // 2 * 2
    return [head_dim - 2 * side, side, side]


def transformer_config(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``FluxTransformer2DModel`` config of original-layout transformer weights."""
    head_dim = weights[_FLUX_KEY].shape[0]
    hidden, in_channels = weights["img_in.weight"].shape
    return {
        **_read_json(CONFIG_DIR / "transformer_config.json"),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "axes_dims_rope": rope_axes(head_dim),
        "in_channels": in_channels,
        "joint_attention_dim": weights["txt_in.weight"].shape[1],
        "pooled_projection_dim": weights["vector_in.in_layer.weight"].shape[1],
        "num_layers": _count(weights, "double_blocks."),
        "num_single_layers": _count(weights, "single_blocks."),
        "guidance_embeds": "guidance_in.in_layer.weight" in weights,
    }


def clip_config(weights: dict[str, torch.Tensor], base: Path = CONFIG_DIR / "clip_l_config.json") -> CLIPTextConfig:
    vocab, hidden = weights["text_model.embeddings.token_embedding.weight"].shape
    projection = weights.get("text_projection.weight")
    return CLIPTextConfig(**{
        **_read_json(base),
        "vocab_size": vocab, "hidden_size": hidden,
        "projection_dim": projection.shape[0] if projection is not None else hidden,
        "num_attention_heads": max(hidden // 64, 1),  # 64-wide heads, as in every CLIP text model
        "num_hidden_layers": _count(weights, "text_model.encoder.layers."),
        "intermediate_size": weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "max_position_embeddings": weights["text_model.embeddings.position_embedding.weight"].shape[0],
    })


def t5_config(weights: dict[str, torch.Tensor]) -> T5Config:
    vocab, d_model = weights["shared.weight"].shape
    attention = "encoder.block.0.layer.0.SelfAttention."
    heads = weights[attention + "relative_attention_bias.weight"].shape[1]
    return T5Config(**{
        **_read_json(CONFIG_DIR / "t5xxl_config.json"),
        "vocab_size": vocab, "d_model": d_model, "num_heads": heads,
        "d_kv": weights[attention + "q.weight"].shape[0] // heads,
        "d_ff": weights["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        "num_layers": _count(weights, "encoder.block."),
    })


def vae_config(weights: dict[str, torch.Tensor], base: Path = CONFIG_DIR / "vae_config.json") -> dict[str, Any]:
    """The ``AutoencoderKL`` config of original-layout (LDM) VAE weights."""
    blocks = _count(weights, "encoder.down.")
    return {
        **_read_json(base),
        "latent_channels": weights["decoder.conv_in.weight"].shape[1],
        "block_out_channels": [weights[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(blocks)],
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "layers_per_block": _count(weights, "encoder.down.0.block."),
        "use_quant_conv": "quant_conv.weight" in weights,
        "use_post_quant_conv": "post_quant_conv.weight" in weights,
    }


# --------------------------------------------------------------------------- building components


_TOP_KEYS = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out",
}
_DOUBLE_KEYS = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2", "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
}
_SINGLE_KEYS = {"modulation.lin": "norm.linear", "norm.query_norm.scale": "attn.norm_q.weight",
                "norm.key_norm.scale": "attn.norm_k.weight", "linear2": "proj_out"}


def _rename(source: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if source == old or source.startswith(old + "."):
            return new + source[len(old):]
    return None


def convert_transformer(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (BFL) transformer keys -> ``FluxTransformer2DModel`` keys, for any width (diffusers' own converter
    assumes the 3072-wide model): fused qkv split into q, k, v; single blocks' ``linear1`` into q, k, v and the MLP
    input; the final modulation's (shift, scale) halves swapped to (scale, shift)."""
    inner = weights["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        block = re.match(r"(double|single)_blocks\.(\d+)\.(.+)", key)
        if block is None:
            if key.startswith("final_layer.adaLN_modulation.1."):
                shift, scale = value.chunk(2, dim=0)
                out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift], dim=0)
                continue
            renamed = _rename(key, _TOP_KEYS)
        elif block[1] == "double":
            prefix, rest = f"transformer_blocks.{block[2]}.", block[3]
            fused = re.fullmatch(r"(img|txt)_attn\.qkv\.(weight|bias)", rest)
            if fused:
                names = ("to_q", "to_k", "to_v") if fused[1] == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
                for name, part in zip(names, value.chunk(3, dim=0)):
                    out[f"{prefix}attn.{name}.{fused[2]}"] = part
                continue
            renamed = _rename(rest, _DOUBLE_KEYS)
            renamed = prefix + renamed if renamed else None
        else:
            prefix, rest = f"single_transformer_blocks.{block[2]}.", block[3]
            fused = re.fullmatch(r"linear1\.(weight|bias)", rest)
            if fused:
                parts = torch.split(value, [inner, inner, inner, value.shape[0] - 3 * inner], dim=0)
                for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
                    out[f"{prefix}{name}.{fused[1]}"] = part
                continue
            renamed = _rename(rest, _SINGLE_KEYS)
            renamed = prefix + renamed if renamed else None
        if renamed is None:
            raise ValueError(f"unknown Flux.1 transformer weight {key!r}")
        out[renamed] = value
    return out


def _load_transformer(weights: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> FluxTransformer2DModel:
    config = transformer_config(weights)
    converted = convert_transformer(_cast(weights, dtype))
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    _assign(model, converted, "transformer", path)
    return model.eval()


def _assign(model: torch.nn.Module, weights: dict[str, torch.Tensor], component: str, path: Path) -> None:
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path}: {len(result.unexpected_keys)} {component} weights do not fit a Flux.1 "
                         f"{component}, e.g. {result.unexpected_keys[:3]}")
    _require_complete(model, component, path)


def load_clip(weights: dict[str, torch.Tensor], dtype: torch.dtype, path: Path, *, cls: type = CLIPTextModel,
              base: Path = CONFIG_DIR / "clip_l_config.json", component: str = "clip_l") -> Any:
    """A CLIP text model (``cls``: with or without its projection) from file weights."""
    keep_projection = cls is not CLIPTextModel
    # Files keep transformers' "text_model." level; drop it where this transformers' model has none.
    weights = {key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: value
               for key, value in _cast(weights, dtype).items()
               if keep_projection or key != "text_projection.weight"}
    with init_empty_weights():
        model = cls(clip_config(weights, base))
    if not any(key.startswith("text_model.") for key in model.state_dict()):
        weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    _assign(model, weights, component, path)
    return model.eval()


def _load_clip(weights: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> CLIPTextModel:
    return load_clip(weights, dtype, path)


def load_t5(weights: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> T5EncoderModel:
    weights = _cast(weights, dtype)
    # The token embedding is stored once, under either name.
    if "shared.weight" not in weights and "encoder.embed_tokens.weight" in weights:
        weights["shared.weight"] = weights["encoder.embed_tokens.weight"]
    weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
    with init_empty_weights():
        model = T5EncoderModel(t5_config(weights))
    _assign(model, weights, "t5xxl", path)
    return model.eval()


def load_vae(weights: dict[str, torch.Tensor], dtype: torch.dtype, path: Path, cache_dir: Path,
             base: Path = CONFIG_DIR / "vae_config.json") -> AutoencoderKL:
    config_dir = _materialize({"vae": vae_config(weights, base)}, cache_dir, "vae-16ch")
    vae = AutoencoderKL.from_single_file(_cast(weights, dtype), config=str(config_dir), subfolder="vae",
                                         local_files_only=True, dtype=dtype)
    _require_complete(vae, "vae", path)
    return vae


def t5_tokenizer(search: Sequence[Path], encoder: T5EncoderModel, weights_file: Path) -> T5TokenizerFast:
    """The T5 tokenizer for ``encoder`` (loaded from ``weights_file``), from the first folder holding its files:
    ``t5_tokenizer/`` in each of ``search`` (the user's), then the shipped one. One with more tokens than the
    encoder's embedding has rows is refused here, naming both, rather than failing later on an index."""
    folders = [*(Path(folder) / T5_TOKENIZER_DIR for folder in search), CONFIG_DIR / T5_TOKENIZER_DIR]
    for folder in folders:
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            tokenizer = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
            rows = encoder.get_input_embeddings().num_embeddings
            if len(tokenizer) > rows:
                users = ", ".join(str(user) for user in folders[:-1]) or "models/text_encoder/t5_tokenizer"
                raise ValueError(
                    f"{weights_file}: the T5 tokenizer in {folder} has {len(tokenizer)} tokens, more than the "
                    f"{rows} rows of this T5 text encoder's embedding; put the tokenizer files that belong to this "
                    f"text encoder (tokenizer.json, tokenizer_config.json) into {users}")
            return tokenizer
    raise ValueError("Flux.1 needs the T5 tokenizer (tokenizer.json and tokenizer_config.json of "
                     f"google/t5-v1_1-xxl) in one of: {', '.join(str(folder) for folder in folders)}")


def clip_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(TOKENIZER_FILES_DIR, local_files_only=True, model_max_length=77)


def _module_parts(module: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """(kind, weights) of an additional module file: ``clip_l``, ``t5xxl`` or ``vae``, prefixes removed."""
    weights = {key: value for part in split_components(read_state_dict(module)).values() for key, value in part.items()}
    kind = module_kind(list(weights))
    if kind is None:
        raise ValueError(f"{module} is none of a Flux.1 model's modules (CLIP-L, T5-XXL text encoder, VAE)")
    return kind, weights


def _load_file(path: Path, *, torch_dtype: torch.dtype, cache_dir: Path, modules: Sequence[Path] = (),
               search: dict[str, Sequence[Path]] | None = None) -> tuple[FluxPipeline, ModelFamily]:
    search = search or {}
    parts, sources, _ = split_files.read_components(path, modules, split_components, _module_parts)
    split_files.require_components(parts, path, label="Flux.1", transformer_key=_FLUX_KEY, required=_COMPONENTS,
                                   search=search)
    transformer = _load_transformer(parts.pop("transformer"), torch_dtype, path)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(_read_json(
            CONFIG_DIR / ("scheduler_dev.json" if transformer.config.guidance_embeds else "scheduler_schnell.json"))),
        vae=load_vae(parts["vae"], torch_dtype, sources["vae"], Path(cache_dir)),
        text_encoder=_load_clip(parts["clip_l"], torch_dtype, sources["clip_l"]),
        tokenizer=clip_tokenizer(),
        text_encoder_2=(t5 := load_t5(parts["t5xxl"], torch_dtype, sources["t5xxl"])),
        tokenizer_2=t5_tokenizer(search.get("text_encoder", ()), t5, sources["t5xxl"]),
        transformer=transformer,
    )
    return pipe, ModelFamily("flux", False, "flow", CONFIG_DIR)


def load(path: Path, *, torch_dtype: torch.dtype, cache_dir: Path, modules: Sequence[Path] = (),
         search: dict[str, Sequence[Path]] | None = None) -> tuple[FluxPipeline, ModelFamily]:
    """A Flux.1 model from a diffusers folder, one file, or a transformer file plus ``modules``."""
    return split_files.load_folder_or_file(path, FluxPipeline, "flux", _load_file, torch_dtype=torch_dtype,
                                           cache_dir=cache_dir, modules=modules, search=search)


# --------------------------------------------------------------------------- conditioning


def _plain_text(text: str) -> tuple[str, bool]:
    """The prompt as T5 and CLIP read it here (emphasis brackets and BREAK taken out), and whether any were."""
    pieces = parse_prompt_attention(text)
    breaks = any(piece == BREAK_MARKER for piece in pieces)
    plain = "".join(" " if piece == BREAK_MARKER else piece[0] for piece in pieces)
    if breaks:  # a BREAK between two words leaves one space
        plain = " ".join(plain.split())
    return plain, breaks or any(weight != 1.0 for _, weight in pieces if (_, weight) != BREAK_MARKER)


def encode(model, prompts: list[str], negative_prompts: list[str], steps: int, request) -> tuple[Conditioning,
                                                                                                    list[str]]:
    """Per-step conditioning: T5 hidden states as ``cond``, CLIP's pooled output as ``pooled``; prompt editing
    works. Emphasis weights and BREAK do nothing for these encoders (a warning says so)."""
    pipe = model.pipe
    device = pipe._execution_device  # under --medvram / --lowvram the offload hooks' device, not the weights'
    real_cfg = request.cfg_scale > 1.0
    prompt_schedules = [get_prompt_schedule(prompt, steps) for prompt in prompts]
    negative_schedules = [get_prompt_schedule(prompt, steps) for prompt in negative_prompts]
    warnings: list[str] = []
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encoding(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if text not in encoded:
            plain, changed = _plain_text(text)
            if changed and not warnings:
                warnings.append("Flux.1: emphasis weights and BREAK are ignored (T5 and the pooled CLIP read the "
                                "plain text); prompt editing works")
            embeds, pooled, _ = pipe.encode_prompt(plain, prompt_2=None, device=device,
                                                   max_sequence_length=MAX_SEQUENCE_LENGTH)
            encoded[text] = (embeds, pooled)
        return encoded[text]

    if not real_cfg and any(negative_prompts):
        warnings.append("Flux.1: the negative prompt is used only with real CFG (CFG scale above 1)")
    starts: list[int] = []
    segments: list[StepConditioning] = []
    schedules = prompt_schedules + (negative_schedules if real_cfg else [])
    changes = sorted({0} | {end for schedule in schedules for end, _ in schedule[:-1]})
    for start in changes:
        cond = [encoding(text_at(schedule, start + 1)) for schedule in prompt_schedules]
        uncond = [encoding(text_at(schedule, start + 1)) for schedule in negative_schedules] if real_cfg else cond
        starts.append(start)
        segments.append(StepConditioning(
            cond=torch.cat([embeds for embeds, _ in cond]), uncond=torch.cat([embeds for embeds, _ in uncond]),
            pooled=torch.cat([pooled for _, pooled in cond]),
            uncond_pooled=torch.cat([pooled for _, pooled in uncond])))
    return Conditioning(starts, segments, prompt_schedules, negative_schedules, []), warnings


# --------------------------------------------------------------------------- sampling


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, C*4): the transformer's 2x2 patches, as diffusers packs them."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, packed = latents.shape
    c = packed // 4
    return latents.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def sample(model, noise: torch.Tensor, conditioning: Conditioning, request,
           on_step: Callable[[int, torch.Tensor], None], source: SourceLatents | None = None) -> torch.Tensor:
    """Denoise ``noise`` (B, 16, h, w) in ``request.steps`` steps of the request's flow-matching sampler; returns
    (B, 16, h, w). With ``source`` (img2img, inpaint, the hires pass) only the steps ``request.denoising_strength``
    leaves run, from the source noised to the first of them (:class:`~pipelines.sampling.flow_img2img.FlowStart`)."""
    transformer = model.pipe.transformer
    device, dtype = model.pipe._execution_device, transformer.dtype  # as in encode()
    b, _, h, w = noise.shape
    noise = noise.to(device=device, dtype=dtype)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    steps = request.steps
    scheduler, timesteps = flow_scheduler(request.sampler_name, request.scheduler, model.scheduler_config,
                                          shift=request.shift, image_seq_len=(h // 2) * (w // 2), steps=steps,
                                          device=device, sigmas=np.linspace(1.0, 1 / steps, steps))
    start = FlowStart(scheduler, timesteps, noise, source, request.denoising_strength)
    latents = pack(start.latents)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], request.distilled_cfg_scale, device=device, dtype=torch.float32).expand(b)
    real_cfg = request.cfg_scale > 1.0

    def predict(embeds: torch.Tensor, pooled: torch.Tensor | None, timestep: torch.Tensor) -> torch.Tensor:
        if pooled is None:
            raise ValueError("Flux.1 conditioning needs the pooled CLIP embeddings")
        text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        return transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=pooled.to(device, dtype), encoder_hidden_states=embeds.to(device, dtype),
                           txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]

    for i, t in enumerate(start.timesteps):
        _report(on_step, i, unpack(latents, h, w))
        cond = conditioning.at_step(i)
        timestep = t.expand(b).to(latents.dtype)
        prediction = predict(cond.cond, cond.pooled, timestep)
        if real_cfg:
            negative = predict(cond.uncond, cond.uncond_pooled, timestep)
            prediction = negative + request.cfg_scale * (prediction - negative)
        latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        if start.inpaint:
            latents = pack(start.keep_unmasked(unpack(latents, h, w), i))
    return unpack(latents, h, w)


def _report(on_step: Callable[[int, torch.Tensor], None], step: int, latents: torch.Tensor) -> None:
    """Report ``step``; a stop there (interrupt, skip) hands on the latents at hand to decode."""
    try:
        on_step(step, latents)
    except JobStopped as stop:
        if stop.latents is None:
            stop.latents = latents
        raise


# --------------------------------------------------------------------------- LoRA files in the original layout

#: Original single-block ``linear1`` rows: q, k, v (the width each) and the MLP input (4 widths), 7 widths in all.
_LINEAR1_WIDTHS = 7


def _linear1_rows(rows: int) -> list[int]:
    width = rows // _LINEAR1_WIDTHS
    return [width, width, width, rows - 3 * width]


def _original_lora_modules() -> dict[str, dict[str, lora_layouts.Target]]:
    """Original module names (``.`` as ``_``) -> targets, for the top level and per double / single block (the
    block's diffusers prefix is added when a name is looked up)."""
    modules = {
        "top": {old.replace(".", "_"): lora_layouts.Target((f"transformer.{new}",)) for old, new in _TOP_KEYS.items()},
        "double": {old.replace(".", "_"): lora_layouts.Target((new,)) for old, new in _DOUBLE_KEYS.items()
                   if not old.endswith(".scale")},
        "single": {old.replace(".", "_"): lora_layouts.Target((new,)) for old, new in _SINGLE_KEYS.items()
                   if not old.endswith(".scale")},
    }
    modules["top"]["final_layer_adaLN_modulation_1"] = lora_layouts.Target(("transformer.norm_out.linear",),
                                                                         swap=True)
    modules["double"]["img_attn_qkv"] = lora_layouts.Target(("attn.to_q", "attn.to_k", "attn.to_v"))
    modules["double"]["txt_attn_qkv"] = lora_layouts.Target(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
    modules["single"]["linear1"] = lora_layouts.Target(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                                                       rows=_linear1_rows)
    return modules


_LORA_MODULES = _original_lora_modules()
_LORA_TRANSFORMER_PREFIXES = ("lora_unet_", "model.diffusion_model.", "diffusion_model.", "")
_LORA_TEXT_ENCODERS = {"lora_te1_": "text_encoder", "lora_te_": "text_encoder",
                       "text_encoders.clip_l.transformer.": "text_encoder"}
_LORA_T5_PREFIXES = ("lora_te3_", "text_encoders.t5xxl.transformer.")


def _lora_target(stem: str) -> lora_layouts.Target | None:
    """The diffusers module(s) of one LoRA module named after the original layout (kohya, ComfyUI, BFL)."""
    encoder = lora_layouts.clip_target(stem, _LORA_TEXT_ENCODERS)
    if encoder is not None:
        return encoder
    name = lora_layouts.underscored(stem, _LORA_TRANSFORMER_PREFIXES)
    block = re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", name or "")
    if block is None:
        return _LORA_MODULES["top"].get(name or "")
    target = _LORA_MODULES[block[1]].get(block[3])
    blocks = "transformer_blocks" if block[1] == "double" else "single_transformer_blocks"
    return None if target is None else target.within(f"transformer.{blocks}.{block[2]}.")


def lora_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux.1 LoRA in the layout diffusers' loader reads: kohya sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv``
    ..., ``lora_te1_`` for CLIP-L) and ComfyUI / BFL keys (``diffusion_model.double_blocks.0...``, ``lora_up`` /
    ``lora_down`` or ``lora_A`` / ``lora_B``) converted for any width (diffusers' own converter assumes the 3072-wide
    model); T5 modules are left out (the pipeline loads no LoRA into T5). Other layouts (diffusers / peft,
    ai-toolkit, XLabs) are returned as they are, for diffusers to read."""
    return lora_layouts.to_peft(state_dict, _lora_target, ignored=_LORA_T5_PREFIXES)


#: Sampling steps of schnell, the timestep-distilled variant (Black Forest Labs recommend 1 to 4).
SCHNELL_STEPS = 4


def is_schnell(path: Path) -> bool:
    """True for a Flux.1 model without a guidance embedder (schnell), read from a single file's header or a
    diffusers folder's transformer config."""
    path = Path(path)
    if path.is_dir():
        config = path / "transformer" / "config.json"
        return config.is_file() and not _read_json(config).get("guidance_embeds", False)
    _, keys = read_safetensors_header(path)
    return not any(key.endswith("guidance_in.in_layer.weight") for key in keys)


def variant_defaults(path: Path) -> dict[str, object]:
    """schnell's few steps; dev keeps the family's defaults."""
    return {"steps": SCHNELL_STEPS} if is_schnell(path) else {}


def infotext_fields(request, model) -> dict[str, object]:
    """Forge's "Distilled CFG Scale" for dev (schnell has no guidance embedder)."""
    if model.pipe.transformer.config.guidance_embeds:
        return {"distilled_cfg_scale": request.distilled_cfg_scale}
    return {}


FAMILY = Family(
    name="flux",
    label="Flux.1",
    claims_keys=_claims,
    folder_classes=("FluxPipeline",),
    config_dir=CONFIG_DIR,
    load=load,
    encode=encode,
    sample=sample,
    samplers=FLOW_SAMPLER_NAMES,
    schedules=FLOW_SCHEDULES,
    fitting_schedule=fitting_flow_schedule,
    defaults={"cfg_scale": 1.0, "sampler_name": "Euler", "scheduler": "Simple"},
    lora_keys=lora_keys,
    variant_defaults=variant_defaults,
    negative_prompt_note="Flux.1 reads the negative prompt only with CFG scale above 1 (real CFG, twice the time)",
    infotext_fields=infotext_fields,
    unet=False,
)
