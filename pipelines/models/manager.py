"""The model manager: the one owner of loaded models, their device, dtype and memory mode.

txt2img, img2img and inpaint all run on the same loaded components. Loaded checkpoints are kept in a
least-recently-used cache whose size is a setting; the active one lives on the device, the others wait
in RAM, and one pushed out of the cache is freed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.models import families
from pipelines.models.acceleration import apply_defaults, fp8_wanted, store_fp8
from pipelines.models.catalog import ModelFile, ModelRegistry
from pipelines.models.checkpoints import ModelFamily, load_vae
from pipelines.models.devices import DeviceConfig, device_config, free_memory, is_out_of_memory
from pipelines.models.weights import ModelFileError, model_file_field
from pipelines.settings import EngineSettings

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A checkpoint ready to sample: its diffusers pipeline (used as a bag of components) and facts about it."""

    file: ModelFile
    family: ModelFamily
    pipe: DiffusionPipeline
    load_seconds: float
    own_vae: torch.nn.Module
    vae_file: ModelFile | None = None
    #: Set once the fp16 VAE produced NaNs; the VAE then stays in fp32 for this model.
    vae_upcast: bool = False
    scheduler_config: dict = field(default_factory=dict)
    #: Folders searched for TAESD preview weights (models/VAE-taesd and extras).
    taesd_dirs: tuple[Path, ...] = ()
    #: The tiny preview VAE, once a TAESD preview loaded it.
    taesd: torch.nn.Module | None = None
    #: Why the TAESD file could not be used for previews (then they are the cheap ones), or None.
    taesd_error: str | None = None

    #: The separate module files (text encoders, VAE) the checkpoint was loaded with (Forge's "VAE / Text Encoder").
    modules: tuple[ModelFile, ...] = ()
    #: True when the denoiser's weights are stored in float8 (the ``fp8_storage`` option).
    fp8: bool = False

    @property
    def spec(self) -> families.Family:
        """The family module's declarations (:mod:`pipelines.models.families`)."""
        return families.get(self.family.name)

    @property
    def is_sdxl(self) -> bool:
        return self.family.name == "sdxl"

    @property
    def is_inpainting(self) -> bool:
        return self.family.inpainting

    @property
    def vae_scale_factor(self) -> int:
        """How much the VAE downsamples: 8 for real models (one less than its number of blocks, as powers of 2)."""
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of this model's latents for a ``width`` x ``height`` image (rounded up)."""
        factor = self.vae_scale_factor
        return math.ceil(height / factor), math.ceil(width / factor)

    @property
    def unet(self):
        """The denoiser: the UNet, or the transformer of a family without one (Flux.1)."""
        unet = getattr(self.pipe, "unet", None)
        return unet if unet is not None else self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae


class ModelManager:
    """Loads, caches and switches checkpoints and VAEs. Thread-safe; the engine holds one."""

    def __init__(self, settings: EngineSettings, registry: ModelRegistry):
        self.settings = settings
        self.registry = registry
        self.device: DeviceConfig = device_config(settings)
        apply_defaults(self.device.device)
        self.cache_size = max(1, settings.checkpoint_cache)
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._vaes: dict[Path, torch.nn.Module] = {}
        self._lock = threading.RLock()
        self._active: str | None = None
        #: The ``fp8_storage`` option used when a caller of :meth:`get` passes none (the engine keeps it current).
        self.fp8_storage = "Disable"

    @property
    def current(self) -> LoadedModel | None:
        """The model the last job used, if it is still loaded."""
        with self._lock:
            return self._loaded.get(self._active) if self._active else None

    def loaded_titles(self) -> list[str]:
        """Titles of the loaded checkpoints, least recently used first (an engine pool's model affinity)."""
        with self._lock:
            return list(self._loaded)

    def default_query(self) -> str:
        """What to load when a request names no checkpoint: the current one, the configured one, or the first."""
        if self._active and self._active in self._loaded:
            return self._loaded[self._active].file.title
        if self.settings.default_checkpoint:
            return self.settings.default_checkpoint
        checkpoints = self.registry.checkpoints
        if not checkpoints:
            raise LookupError(
                "checkpoint: no checkpoints found; put a .safetensors file or a diffusers folder into "
                f"{self.registry.paths.model_dirs('checkpoint')[0]}"
            )
        return checkpoints[0].title

    def resolve(self, checkpoint: str | None) -> ModelFile:
        """The model file a request means; LookupError names what is available."""
        return self.registry.find_checkpoint(checkpoint or self.default_query())

    def get(self, checkpoint: str | None = None, vae: str = "Automatic", modules: Sequence[str] = (),
            fp8_storage: str | None = None) -> LoadedModel:
        """The loaded model for ``checkpoint`` with ``vae`` attached, on the device; loads it if needed.

        ``modules`` name separate text encoder / VAE files (``models/text_encoder``, ``models/VAE``) that complete
        a checkpoint stored without them. ``fp8_storage`` (the option; None: :attr:`fp8_storage`) decides whether
        the denoiser is kept in float8; a loaded model stored the other way is loaded again. A file that cannot
        be used raises :class:`ModelFileError` naming it and why, with ``field`` ``checkpoint``, ``vae`` or
        ``additional_modules``; the models loaded before stay usable."""
        file = self.resolve(checkpoint)
        vae_file = None if vae in ("Automatic", "", None, "None") else self.registry.find_vae(vae)
        module_files = tuple(self.registry.find_module(name) for name in modules)
        key = file.title if not module_files else " + ".join([file.title, *(m.title for m in module_files)])
        choice = self.fp8_storage if fp8_storage is None else fp8_storage
        with self._lock:
            model = self._loaded.get(key)
            if model is not None and model.fp8 != fp8_wanted(choice, model.family.name, self.device.device):
                self._drop(key)
                model = None
            if model is None:
                with model_file_field("checkpoint"), _unusable_file(file.path):
                    model = self._load(file, module_files, key)
                    if fp8_wanted(choice, model.family.name, self.device.device):
                        store_fp8(model.unet, self.device.dtype)
                        model.fp8 = True
            self._loaded.move_to_end(key)
            if self._active != key:
                self._activate(model)
                self._active = key
            if vae_file is not None:
                with model_file_field("vae"), _unusable_file(vae_file.path):
                    self._set_vae(model, vae_file)
            else:
                self._set_vae(model, vae_file)
            return model

    def unload(self) -> None:
        """Free every loaded model."""
        with self._lock:
            self._loaded.clear()
            self._vaes.clear()
            self._active = None
        free_memory()

    def reload(self) -> LoadedModel | None:
        """Load the current checkpoint again from disk (after the file changed)."""
        with self._lock:
            current = self.current
            self.unload()
            if current is None:
                return None
            return self.get(current.file.title, modules=[module.name for module in current.modules])

    # --- internals
    def _load(self, file: ModelFile, modules: tuple[ModelFile, ...] = (), key: str = "") -> LoadedModel:
        self._make_room()
        started = time.perf_counter()
        paths = self.registry.paths
        pipe, family = families.load_checkpoint(
            file.path, torch_dtype=self.device.dtype, cache_dir=paths.cache_dir / "configs",
            modules=[module.path for module in modules],
            search={kind: paths.model_dirs(kind) for kind in ("text_encoder", "vae")},
        )
        pipe.set_progress_bar_config(disable=True)
        if self.device.vae_dtype != self.device.dtype:
            pipe.vae.to(dtype=self.device.vae_dtype)
        model = LoadedModel(
            file=file, family=family, pipe=pipe, load_seconds=time.perf_counter() - started,
            own_vae=pipe.vae, scheduler_config=dict(pipe.scheduler.config),
            taesd_dirs=self.registry.paths.model_dirs("taesd"), modules=modules,
        )
        self._loaded[key or file.title] = model
        log.info("Loaded %s (%s) in %.1f s", file.title, family.name, model.load_seconds)
        return model

    def _make_room(self) -> None:
        while len(self._loaded) >= self.cache_size:
            self._drop(next(iter(self._loaded)))

    def _drop(self, key: str) -> None:
        """Forget the loaded model under ``key``, freeing its device memory."""
        old = self._loaded.pop(key)
        log.info("Unloading %s", key)
        if self._active == key:
            self._active = None
        if self.device.is_accelerator and old.pipe.device.type != "cpu":
            # A running job may still hold it (the base while its refiner or hires checkpoint loads): off the
            # device now, so that only the model being loaded takes device memory.
            old.pipe.to("cpu")
        del old
        free_memory()

    def _activate(self, model: LoadedModel) -> None:
        # Park the others in RAM so that only one model takes device memory.
        if self.device.is_accelerator:
            for other in self._loaded.values():
                if other is not model and other.pipe.device.type != "cpu":
                    other.pipe.to("cpu")
                    if self.device.device.type == "cuda" and self.device.memory_mode == "normal":
                        _pin(other.pipe)
            free_memory()
        mode = self.device.memory_mode
        if mode == "medvram":
            model.pipe.enable_model_cpu_offload(device=self.device.device)
        elif mode == "lowvram":
            model.pipe.enable_sequential_cpu_offload(device=self.device.device)
        else:
            model.pipe.to(self.device.device)

    def _set_vae(self, model: LoadedModel, vae_file: ModelFile | None) -> None:
        if model.vae_file == vae_file:
            return
        if vae_file is None:
            vae = model.own_vae
        else:
            cached = self._vaes.get(vae_file.path)
            if cached is None:
                cached = load_vae(vae_file.path, model.family, torch_dtype=self.device.vae_dtype,
                                  cache_dir=self.registry.paths.cache_dir / "configs")
                self._vaes = {vae_file.path: cached}  # keep one external VAE: they are small but add up
            vae = cached
        model.pipe.vae = vae
        model.vae_file = vae_file
        model.vae_upcast = False
        if self.device.memory_mode == "normal":
            vae.to(self.device.device)
        else:
            self._activate(model)  # the offload hooks must cover the new VAE


@contextmanager
def _unusable_file(path: Path) -> Iterator[None]:
    """A model file that reads but does not load (of another kind, wrong shapes, an unknown layout) as a
    :class:`ModelFileError` naming it; out of memory and errors already naming the file pass as they are."""
    try:
        yield
    except ModelFileError:
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        if is_out_of_memory(error):
            raise
        reason = str(error).strip("'\"") or type(error).__name__
        shown = reason if str(path) in reason else f"{path}: {reason}"
        raise ModelFileError(path, shown) from error


def _pin(pipe) -> None:
    """Move a parked model's weights into pinned (page-locked) RAM: copying them back to the GPU then runs
    by direct DMA instead of through a pageable staging buffer (not yet timed on a GPU here)."""
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if tensor.device.type == "cpu" and not tensor.is_pinned():
                tensor.data = tensor.data.pin_memory()
