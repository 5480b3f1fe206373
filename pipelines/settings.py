"""Engine settings: where model files live and how models run.

``launch.py`` parses the command line once and builds one frozen :class:`EngineSettings`;
nothing in the engine reads ``sys.argv``, the environment or config files at import time.
This module imports only the standard library so that ``launch.py`` can use it before the
virtual environment exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Model kinds and the A1111 sub-folder of ``models/`` each lives in (docs/compatibility.md §3).
MODEL_FOLDERS: dict[str, str] = {
    "checkpoint": "Stable-diffusion",
    "vae": "VAE",
    "lora": "Lora",
    "controlnet": "ControlNet",
    "esrgan": "ESRGAN",
    "realesrgan": "RealESRGAN",
    "taesd": "VAE-taesd",
}

#: File endings each kind is found by.
MODEL_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "checkpoint": (".safetensors", ".ckpt"),
    "vae": (".safetensors", ".ckpt", ".pt"),
    "lora": (".safetensors", ".pt"),
    "controlnet": (".safetensors", ".pth", ".ckpt"),
    "esrgan": (".pth", ".safetensors"),
    "realesrgan": (".pth", ".safetensors"),
    "taesd": (".safetensors", ".pth"),
}


@dataclass(frozen=True)
class Paths:
    """Folders the engine reads and writes.

    ``extra_dirs`` maps a model kind to folders searched besides ``models_dir/<kind folder>``
    (from ``--ckpt-dir``, ``--vae-dir``, ``--lora-dir`` ...).
    """

    data_dir: Path
    models_dir: Path
    outputs_dir: Path
    extra_dirs: dict[str, tuple[Path, ...]] = field(default_factory=dict)

    @classmethod
    def under(cls, data_dir: Path | str, models_dir: Path | str | None = None) -> Paths:
        """The A1111 layout below ``data_dir``: ``models/``, ``outputs/``."""
        data = Path(data_dir).resolve()
        models = Path(models_dir).resolve() if models_dir else data / "models"
        return cls(data_dir=data, models_dir=models, outputs_dir=data / "outputs")

    def model_dirs(self, kind: str) -> tuple[Path, ...]:
        """Folders to scan for models of ``kind`` (a key of :data:`MODEL_FOLDERS`)."""
        return (self.models_dir / MODEL_FOLDERS[kind], *self.extra_dirs.get(kind, ()))

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
