"""Engine settings: where model files live and how models run.

``launch.py`` parses the command line once and builds one frozen :class:`EngineSettings`;
nothing in the engine reads ``sys.argv``, the environment or config files at import time.
This module imports only the standard library so that ``launch.py`` can use it before the
virtual environment exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipelines.paths import AllowedRoots


@dataclass(frozen=True)
class ModelKind:
    """One kind of model file and the sub-folder of ``models/`` it lives in (A1111 / Forge names).

    - ``name``: the key code asks for (``Paths.model_dirs("lora")``).
    - ``folder``: the folder below ``models/``, ``/``-separated when nested (``ControlNet/annotators``).
    - ``what``: a short plural noun; the tracked placeholder is ``models/<folder>/Put <what> here.txt``.
    - ``description``: what goes there, one sentence (the placeholder's text and ``models/README.md``).
    - ``extensions``: the file endings looked for.
    - ``in_use``: False for a folder kept for a feature this version does not have yet.
    """

    name: str
    folder: str
    what: str
    description: str
    extensions: tuple[str, ...]
    in_use: bool = True

    @property
    def placeholder_name(self) -> str:
        return f"Put {self.what} here.txt"

    @property
    def placeholder_text(self) -> str:
        """The one line of the placeholder file (the app reads it never and writes it never)."""
        note = "" if self.in_use else " This version does not read this folder yet."
        return f"{self.description} File types: {', '.join(self.extensions)}.{note}\n"


#: Every model folder the app reads or keeps, in the order ``models/README.md`` lists them. The one list:
#: code asks :meth:`Paths.model_dirs` by kind name, and a test checks that each kind has its tracked folder
#: and placeholder under ``models/``.
MODEL_KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("checkpoint", "Stable-diffusion", "Stable Diffusion checkpoints",
              "Checkpoints: SD 1.x, SD 2.x (512 and 768-v), SDXL, SD 3.5 and Flux.1, inpainting models too, as "
              "single files or diffusers folders.", (".safetensors", ".ckpt")),
    ModelKind("vae", "VAE", "VAE", "VAEs chosen in the top bar's VAE list instead of a checkpoint's own.",
              (".safetensors", ".ckpt", ".pt")),
    ModelKind("taesd", "VAE-taesd", "TAESD tiny VAEs",
              "Optional tiny VAEs for sharp live previews: TAESD for SD 1.x / 2.x, TAESDXL (\"xl\" in the "
              "name) for SDXL, as single files or diffusers folders.", (".safetensors", ".pth")),
    ModelKind("lora", "Lora", "LoRA models",
              "LoRA / LoCon networks for `<lora:name:weight>` prompt tags (kohya / A1111 and diffusers / peft "
              "formats; SD 1.x, 2.x, SDXL; Flux.1 and SD 3.5 also from ComfyUI, ai-toolkit, XLabs).",
              (".safetensors", ".pt")),
    ModelKind("esrgan", "ESRGAN", "ESRGAN upscalers",
              "Image upscalers: ESRGAN, SwinIR and the other architectures spandrel reads.",
              (".pth", ".safetensors")),
    ModelKind("realesrgan", "RealESRGAN", "Real-ESRGAN upscalers",
              "Real-ESRGAN upscalers (RealESRGAN_x4plus is listed as R-ESRGAN 4x+, as in A1111).",
              (".pth", ".safetensors")),
    ModelKind("controlnet", "ControlNet", "ControlNet models",
              "ControlNet models for SD 1.x and SDXL, as single files in the original layout or diffusers "
              "folders.", (".safetensors", ".pth")),
    ModelKind("controlnet_annotator", "ControlNet/annotators", "annotator weights",
              "Weights of ControlNet preprocessors that run a network (depth, openpose, segmentation, ...), one "
              "folder per annotator under the reference file names (annotators/midas/dpt_hybrid-midas-501f0c75.pt, "
              "annotators/openpose/body_pose_model.pth, annotators/upernet/config.json + pytorch_model.bin, ...; "
              "docs/compatibility.md §10); none are bundled.",
              (".pth", ".safetensors", ".pt", ".bin")),
    ModelKind("text_encoder", "text_encoder", "text encoders",
              "Text encoders (CLIP-L, CLIP-G, T5) for diffusion models stored without them (Flux.1, SD 3.5), "
              "chosen in the top bar's VAE / Text Encoder list; a t5_tokenizer/ folder here replaces the shipped T5 "
              "tokenizer.",
              (".safetensors",)),
    ModelKind("unet", "unet", "diffusion models",
              "Diffusion-model-only files (a Flux.1 or SD 3.5 transformer without text encoders or VAE), listed "
              "with the checkpoints.", (".safetensors",)),
    ModelKind("clip", "CLIP", "CLIP models",
              "CLIP image-text models for the Evaluate tab's CLIP score: transformers CLIP folders (config.json, "
              "weights, preprocessor and tokenizer files), open_clip folders (open_clip_config.json and "
              "open_clip_model.safetensors), or open_clip .safetensors files named after their architecture "
              "(ViT-L-14.safetensors).", (".safetensors", ".bin")),
    ModelKind("evaluation", "evaluation", "evaluation weights",
              "Weights of image-quality metrics: the Inception network of FID, KID and Inception Score "
              "(weights-inception-2015-12-05-6726825d.pth, as torch-fidelity uses); LPIPS's AlexNet "
              "(alexnet-owt-7be5be79.pth, as torchvision names it) and, optionally, its linear layers (alex.pth, "
              "as the lpips package names it).", (".pth",)),
    ModelKind("gfpgan", "GFPGAN", "GFPGAN models",
              "GFPGAN face restoration models (GFPGANv1.4.pth: a name containing GFPGAN) and the face detector "
              "both restorers use (detection_Resnet50_Final.pth).", (".pth",)),
    ModelKind("codeformer", "Codeformer", "CodeFormer models",
              "CodeFormer face restoration models (codeformer-v0.1.0.pth).", (".pth",)),
    ModelKind("clip_vision", "clip_vision", "CLIP vision encoders",
              "CLIP vision encoders for image prompts (IP-Adapter units of ControlNet): transformers "
              "CLIPVisionModelWithProjection folders clip_h/ (ViT-H) and clip_g/ (ViT-bigG).", (".safetensors",)),
)}

#: Kind -> its sub-folder of ``models/`` (from :data:`MODEL_KINDS`).
MODEL_FOLDERS: dict[str, str] = {name: kind.folder for name, kind in MODEL_KINDS.items()}

#: Kind -> the file endings it is found by (from :data:`MODEL_KINDS`).
MODEL_EXTENSIONS: dict[str, tuple[str, ...]] = {name: kind.extensions for name, kind in MODEL_KINDS.items()}


def model_kind(name: str) -> ModelKind:
    """The registered kind called ``name``; a ValueError naming the known kinds otherwise."""
    try:
        return MODEL_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; known kinds: {', '.join(MODEL_KINDS)}") from None


@dataclass(frozen=True)
class Paths:
    """Folders the engine reads and writes.

    ``extra_dirs`` maps a model kind to folders searched besides ``models_dir/<kind folder>``
    (from ``--ckpt-dir``, ``--vae-dir``, ``--lora-dir`` ...). A nested kind (``ControlNet/annotators``)
    is also looked for in the same place below its parent kind's extra folders.

    ``allowed_dirs`` are further folders the operator lets users read and write (``--allowed-dir``);
    :meth:`allowed_roots` is where any folder a user names must lie (:func:`pipelines.paths.confine`).
    """

    data_dir: Path
    models_dir: Path
    outputs_dir: Path
    extra_dirs: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    allowed_dirs: tuple[Path, ...] = ()

    def allowed_roots(self) -> AllowedRoots:
        """The data dir, then the outputs and models dirs, the per-kind folders and ``allowed_dirs``."""
        extra = (self.outputs_dir, self.models_dir, *(d for dirs in self.extra_dirs.values() for d in dirs),
                 *self.allowed_dirs)
        return AllowedRoots(data_dir=self.data_dir, extra=tuple(extra))

    @classmethod
    def under(cls, data_dir: Path | str, models_dir: Path | str | None = None) -> Paths:
        """The A1111 layout below ``data_dir``: ``models/``, ``outputs/``."""
        data = Path(data_dir).resolve()
        models = Path(models_dir).resolve() if models_dir else data / "models"
        return cls(data_dir=data, models_dir=models, outputs_dir=data / "outputs")

    def model_dirs(self, kind: str) -> tuple[Path, ...]:
        """Folders to scan for models of ``kind`` (a key of :data:`MODEL_KINDS`; others raise ValueError)."""
        folder = model_kind(kind).folder
        dirs = [self.models_dir / folder, *self.extra_dirs.get(kind, ())]
        for parent in MODEL_KINDS.values():
            if folder.startswith(parent.folder + "/"):
                rest = folder[len(parent.folder) + 1:]
                dirs += [extra / rest for extra in self.extra_dirs.get(parent.name, ())]
        return tuple(dirs)

    def create_model_dirs(self) -> tuple[Path, ...]:
        """Create each kind's folder under ``models_dir`` that is missing (at start); return the new ones.

        Only folders are made: the placeholder files in them are tracked in git, never written here.
        """
        created = []
        for kind in MODEL_KINDS.values():
            path = self.models_dir / kind.folder
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                created.append(path)
        return tuple(created)

    @property
    def cache_dir(self) -> Path:
        """Where derived data (the hash cache, converted configs) is kept."""
        return self.data_dir / "cache"

    @property
    def embeddings_dir(self) -> Path:
        return self.data_dir / "embeddings"

    @property
    def styles_file(self) -> Path:
        return self.data_dir / "styles.csv"


@dataclass(frozen=True)
class EngineSettings:
    """How the engine runs models. Defaults suit a GPU with enough memory.

    - ``device``: "auto" (cuda, then mps, then cpu) or an explicit torch device string.
    - ``precision``: "auto" (fp16 on GPU, fp32 on CPU), "full" (fp32 everywhere, ``--no-half``),
      "half" or "bf16".
    - ``no_half_vae``: keep the VAE in fp32 even when the rest runs in half precision.
    - ``memory_mode``: "normal", "medvram" (model CPU offload) or "lowvram" (sequential offload).
    - ``checkpoint_cache``: how many loaded checkpoints are kept (least recently used goes first).
    """

    paths: Paths
    device: str = "auto"
    precision: str = "auto"
    no_half_vae: bool = False
    memory_mode: str = "normal"
    checkpoint_cache: int = 1
    default_checkpoint: str | None = None
