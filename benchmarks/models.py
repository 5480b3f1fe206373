"""What the benchmark measures on: real-size random-weight models, the device's matrix rate, UNet FLOPs.

Compute cost does not depend on the weight values, so a model built from the shipped configs with random
weights times like the real one, and no download is needed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "models" / "configs"


def build_random_model(folder: Path, family: str = "sd15", seed: int = 0, *, device: str = "cpu") -> Path:
    """A real-size diffusers folder (``sd15`` or ``sdxl``) with random weights, saved in fp16 safetensors.

    Weights are drawn on ``device`` (a GPU draws SDXL's 3.5 G parameters in seconds) and saved half size,
    as real checkpoints are distributed.
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipelines.models.checkpoints import shipped_tokenizer
    from pipelines.sampling.samplers import build_scheduler

    torch.manual_seed(seed)
    base = CONFIGS / family
    scheduler_config = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    scheduler = build_scheduler("Euler", "Automatic", scheduler_config)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(base / "text_encoder"))
        if family == "sdxl":
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(base / "text_encoder_2"))
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=shipped_tokenizer("sdxl"), tokenizer_2=shipped_tokenizer("sdxl", "tokenizer_2"),
                unet=unet, scheduler=scheduler, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=shipped_tokenizer("sd1"), unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    target = folder / f"random-{family}"
    pipe.save_pretrained(target, safe_serialization=True)
    del pipe
    return target


def build_random_sd15(folder: Path, seed: int = 0) -> Path:
    """An SD 1.5-sized diffusers folder with random weights (kept for callers of the first benchmark)."""
    return build_random_model(folder, "sd15", seed)


#: ``--small``: the transformer families cut in depth and inner width so that they run on a CPU. The widths the
#: components exchange (T5 4096, CLIP-L 768, CLIP-G 1280, 16 latent channels) and T5's 32128-row embedding stay
#: real, so the same loading and conditioning code runs as with the full models.
SMALL_FLOW = {
    "flux": {"num_layers": 1, "num_single_layers": 2, "num_attention_heads": 4},
    "sd3": {"num_layers": 2, "num_attention_heads": 4, "caption_projection_dim": 256},
    "t5": {"num_layers": 2, "num_heads": 8, "d_ff": 1024},
    "clip": {"num_hidden_layers": 2},
    "vae": {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1},
}
#: How ``--storages`` store the transformer and text encoders in the file (the VAE stays bf16).
STORAGE_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}


def build_random_flow_files(folder: Path, family: str, storages: tuple[str, ...] = ("fp8", "bf16"), *,
                            small: bool = False, seed: int = 0, device: str = "cpu") -> dict[str, Path]:
    """Single files holding a whole random-weight Flux.1 dev (``flux``) or SD 3.5 Large (``sd3``) as the published
    all-in-one files do (original key names), one per storage of ``STORAGE_DTYPES``, all with the same weights.

    Sizes come from the shipped configs (``SMALL_FLOW`` cuts them with ``small``); weights are drawn on
    ``device`` in bf16 (the fp32 master copy of a 12 G-parameter transformer would not be needed for timing).
    """
    import safetensors.torch

    from tests.fixtures import tiny_flux, tiny_sd3
    from tests.fixtures.tiny_models import vae_to_original

    models = _random_flow_components(family, small, seed, device)
    to_original = tiny_flux.transformer_to_original if family == "flux" else tiny_sd3.transformer_to_original
    t5 = models["t5xxl"].state_dict()
    t5.pop("encoder.embed_tokens.weight")  # the same tensor as shared.weight, which files keep
    parts = {"model.diffusion_model.": to_original(models.pop("transformer")),
             "text_encoders.t5xxl.transformer.": t5,
             **{f"text_encoders.{name}.transformer.": tiny_sd3.clip_to_file(models[name])
                for name in ("clip_l", "clip_g") if name in models}}
    vae_prefix = "vae." if family == "flux" else "first_stage_model."
    vae = {vae_prefix + key: value.to(torch.bfloat16) for key, value in vae_to_original(models["vae"], "").items()}
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for storage in storages:
        dtype = STORAGE_DTYPES[storage]
        state = {prefix + key: (value.to(dtype) if value.is_floating_point() else value).contiguous()
                 for prefix, part in parts.items() for key, value in part.items()}
        files[storage] = folder / f"random-{family}-{storage}.safetensors"
        safetensors.torch.save_file({**state, **vae}, str(files[storage]))
        del state
    return files


def _random_flow_components(family: str, small: bool, seed: int, device: str) -> dict[str, torch.nn.Module]:
    """The random-weight components of ``family`` (transformer, clip_l, clip_g for SD 3.5, t5xxl, vae), in bf16."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def config(path: Path, cut: str) -> dict:
        return {**json.loads(path.read_text()), **(SMALL_FLOW[cut] if small else {})}

    torch.manual_seed(seed)
    transformer_class = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            models = {
                "transformer": transformer_class.from_config(config(CONFIGS / family / "transformer_config.json",
                                                                    family)),
                "clip_l": CLIPTextModelWithProjection(CLIPTextConfig(**config(CONFIGS / "flux" / "clip_l_config.json",
                                                                              "clip"))),
                "t5xxl": T5EncoderModel(T5Config(**config(CONFIGS / "flux" / "t5xxl_config.json", "t5"))),
                "vae": AutoencoderKL.from_config(config(CONFIGS / family / "vae_config.json", "vae")),
            }
            if family == "sd3":
                models["clip_g"] = CLIPTextModelWithProjection(CLIPTextConfig(**config(
                    CONFIGS / "sd3" / "clip_g_config.json", "clip")))
    finally:
        torch.set_default_dtype(saved)
    return models


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeat: int = 10) -> float:
    """Measured dense matrix-product rate of ``device`` in TFLOP/s (the roofline the UNet is held to)."""
    if device.type != "cuda":
        size = 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeat
    return 2 * size**3 / seconds / 1e12


def unet_step_flops(unet, latents: torch.Tensor, cfg: bool, encoder_hidden_states: torch.Tensor,
                    added_cond_kwargs: dict | None = None) -> int:
    """FLOPs of one sampling step: one UNet call on the CFG-doubled batch, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.cat([latents] * 2) if cfg else latents
    kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        unet(sample, torch.tensor(500, device=latents.device), encoder_hidden_states=encoder_hidden_states,
             return_dict=False, **kwargs)
    return counter.get_total_flops()


def step_flops_for(model, batch: int, height: int, width: int, cfg: bool = True) -> int:
    """FLOPs of one step of ``model`` (a LoadedModel) at this batch and size, with random inputs."""
    unet = model.unet
    device, dtype = unet.device, unet.dtype
    rows = batch * (2 if cfg else 1)
    factor = model.vae_scale_factor
    latents = torch.randn(batch, unet.config.in_channels, height // factor, width // factor, device=device,
                          dtype=dtype)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if model.is_sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(rows, pooled, device=device, dtype=dtype),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * rows, device=device,
                                          dtype=dtype)}
    return unet_step_flops(unet, latents, cfg, context, added)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (so wall-clock times cover it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
