"""The training loop on the engine's loaded model, from a checked dataset, with saves, resume, progress, a
loss log and sample images; one loop for both methods:

- ``lora``: a peft adapter is added to the UNet (and text encoders) for the run and taken out afterwards;
- ``fine-tune``: the UNet (and text encoders) are trained in place in float32; their weights as loaded are
  kept on the CPU and put back afterwards, whatever happens, so the engine's model is what it was.

Only what the methods differ in is theirs (:class:`_Method`: which parameters train, what a save writes,
what resume restores); data, noise, loss (following the checkpoint's prediction type), optimizer, schedule,
precision, accumulation, EMA, samples and the resume state are shared. Everything random is drawn from the
seed and the step number (data order per epoch, crops, flips, captions, noise, timesteps), so a run stopped
at step k and resumed from its save ends with the same weights as a run that never stopped.

Files of a run named ``NAME``:

- LoRA: ``models/Lora/NAME.safetensors`` (kohya keys and ``ss_*`` metadata); fine-tune:
  ``models/Stable-diffusion/NAME.safetensors`` (a single-file checkpoint in the original key layout,
  :mod:`pipelines.models.checkpoint_writer`, with the ``ss_*`` training metadata and the settings, and the
  base model's sidecar ``NAME.yaml`` when it has one); ``NAME-stepNNNNNNNN.safetensors`` for intermediate
  saves, ``NAME.train.json`` (the settings) beside them;
- ``outputs/train/NAME/``: ``settings.json``, ``loss.csv``, ``train-state.pt`` (trained weights, EMA,
  optimizer, LR schedule, step, loss history: what resume reads), ``samples/`` (PNG with infotext).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipelines.files import atomic_output, write_atomically
from pipelines.images.saving import embed_infotext
from pipelines.job_control import JobControl, JobInterrupted
from pipelines.models.checkpoint_writer import original_entries, write_checkpoint
from pipelines.models.weights import read_weights_raw
from pipelines.prompts.encoding import PromptEncoder
from pipelines.request import GenerationRequest
from pipelines.sampling.latents import encode, pil_to_tensor
from pipelines.training import lora
from pipelines.training.dataset import DatasetReport, fit_to_bucket, process_caption, scan_dataset
from pipelines.training.settings import SHAPE_FIELDS, TARGETS, TEXT_ENCODER_TARGETS, TrainingSettings

_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Metadata key of a fine-tuned checkpoint holding its training settings (JSON); also how a file is known to
#: be a training output that a new run of the same name may replace.
TRAINING_METADATA = "sdui_training_settings"

if TYPE_CHECKING:
    from pipelines.engine import Engine
    from pipelines.models.manager import LoadedModel

log = logging.getLogger(__name__)

_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class SampleImage:
    step: int
    prompt: str
    path: Path
    image: Image.Image
    infotext: str


@dataclass
class TrainingState:
    """What a run reports while it trains and when it ends."""

    settings: TrainingSettings
    total_steps: int = 0
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[SampleImage] = field(default_factory=list)
    it_per_s: float = 0.0
    eta_seconds: float | None = None
    output: Path | None = None
    saves: list[Path] = field(default_factory=list)
    interrupted: bool = False
    report: DatasetReport | None = None


def run_folder(engine: Engine, name: str) -> Path:
    return engine.paths.outputs_dir / "train" / name


def lora_path(engine: Engine, name: str, step: int | None = None) -> Path:
    stem = name if step is None else f"{name}-step{step:08d}"
    return engine.paths.model_dirs("lora")[0] / f"{stem}.safetensors"


def checkpoint_path(engine: Engine, name: str, step: int | None = None) -> Path:
    """Where a fine-tune run saves: the first checkpoint folder, so the checkpoint list shows it at once."""
    stem = name if step is None else f"{name}-step{step:08d}"
    return engine.paths.model_dirs("checkpoint")[0] / f"{stem}.safetensors"


def output_path(engine: Engine, settings: TrainingSettings, step: int | None = None) -> Path:
    """The file a run of ``settings`` writes (at ``step`` for an intermediate save)."""
    if settings.method == "fine-tune":
        return checkpoint_path(engine, settings.name, step)
    return lora_path(engine, settings.name, step)


def check_output(engine: Engine, settings: TrainingSettings, base: Path | None = None) -> None:
    """Refuse (ValueError naming ``name``) a fine-tune whose checkpoint would replace its base model (the final
    save, or an intermediate ``NAME-stepN`` one) or a checkpoint no training run wrote. ``base`` defaults to
    the checkpoint ``settings`` names. A LoRA replaces its earlier file of the same name, as before."""
    if settings.method != "fine-tune":
        return
    base = (base or engine.models.resolve(settings.checkpoint).path).resolve()
    target = output_path(engine, settings)
    if base == target.resolve() or (base.parent == target.parent.resolve()
                                    and base.name.startswith(f"{settings.name}-step")):
        raise ValueError(f"name: {settings.name!r} would overwrite the base checkpoint {base.name}; choose another")
    if target.exists() and not _is_training_output(target):
        raise ValueError(f"name: {target} exists and was not written by a training run; choose another name")


def train(engine: Engine, settings: TrainingSettings, dataset: Path, *, control: JobControl | None = None,
          on_step: Callable[[TrainingState], None] | None = None) -> TrainingState:
    """Train ``settings`` on the (already resolved) ``dataset`` folder; returns the final state.

    ValueError names the field when the dataset has no usable image or a setting cannot be met here.
    A stop (``control.interrupt()``) saves a resumable state at the step reached and returns normally."""
    return _Run(engine, settings, dataset, control or JobControl(), on_step).run()


class _Run:
    def __init__(self, engine: Engine, settings: TrainingSettings, dataset: Path, control: JobControl,
                 on_step: Callable[[TrainingState], None] | None):
        self.engine, self.s, self.dataset, self.control, self.on_step = engine, settings, dataset, control, on_step
        self.state = TrainingState(settings)
        self.folder = run_folder(engine, settings.name)
        self.started_at = datetime.now(UTC)

    # --- set-up --------------------------------------------------------------------------------------

    def run(self) -> TrainingState:
        s = self.s
        report = scan_dataset(self.dataset, s.resolution, missing_captions=s.missing_captions)
        self.state.report = report
        if not report.items:
            raise ValueError(f"dataset: no usable image in {self.dataset}\n{report.summary()}")
        if s.steps == 0 and s.epochs == 0:
            raise ValueError("steps: give a number of steps, or of epochs")
        self.items = report.items
        self.batches_per_epoch = self._epoch_batches(0).__len__()
        total = s.steps or s.epochs * math.ceil(self.batches_per_epoch / s.gradient_accumulation)
        self.state.total_steps = total
        # The model is changed (trainable layers, gradients) until the run ends: no generation may use it or
        # the device meanwhile, so the whole run holds the engine's device lock.
        with self.engine.device_lock:
            model = self.engine.models.get(s.checkpoint)
            self.model = model
            self.method: _Method = _FineTune(self) if s.method == "fine-tune" else _Lora(self)
            self.method.check()
            device = next(model.unet.parameters()).device
            self.device = device
            if s.optimizer == "AdamW8bit" and device.type != "cuda":
                raise ValueError("optimizer: AdamW8bit needs a CUDA device; allowed here: AdamW")
            with self._prepared(model) as params:
                return self._train(model, params, total)

    @contextmanager
    def _prepared(self, model: LoadedModel) -> Iterator[list[dict[str, Any]]]:
        s = self.s
        pipe = model.pipe
        self.encoders = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
                         if e is not None]
        modules = [model.unet, *self.encoders, model.vae]
        grad_flags = {id(p): p.requires_grad for m in modules for p in m.parameters()}
        for m in modules:
            m.requires_grad_(False)
        checkpointing = s.gradient_checkpointing and not model.unet.is_gradient_checkpointing
        try:
            torch.manual_seed(s.seed)
            groups = self.method.add()
            if checkpointing:
                model.unet.enable_gradient_checkpointing()
            yield groups
        finally:
            if checkpointing:
                model.unet.disable_gradient_checkpointing()
            self.method.remove()
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(grad_flags.get(id(p), False))

    # --- data ----------------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (item indices, one bucket each) of ``epoch``, in a seeded order."""
        rng = random.Random(f"{self.s.seed}-epoch-{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i: i + self.s.batch_size] for i in range(0, len(indices), self.s.batch_size)]
        rng.shuffle(batches)
        return batches

    def _micro_batch(self, number: int) -> list[int]:
        epoch, position = divmod(number, self.batches_per_epoch)
        if getattr(self, "_epoch_cache", (None,))[0] != epoch:
            self._epoch_cache = (epoch, self._epoch_batches(epoch))
        return self._epoch_cache[1][position]

    def _latent(self, index: int, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image's latents (1, C, h, w) and its crop's (top, left); cached unless crops are random."""
        flip = self.s.flip and rng.random() < 0.5
        key = (index, flip)
        cached = self._latents.get(key)
        if cached is not None:
            return cached
        item = self.items[index]
        with Image.open(item.path) as opened:
            picture, crop = fit_to_bucket(opened, item.bucket, self.s.crop, rng)
        if flip:
            picture = ImageOps.mirror(picture)
        vae = self.model.vae
        with torch.no_grad():
            latents = encode(vae, pil_to_tensor([picture]), [torch.Generator().manual_seed(self.s.seed + index)])
        result = (latents.to(self.device, torch.float32), crop)
        if self.s.crop != "random":
            self._latents[key] = result
        return result

    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoded captions (B, 77*k, D) padded with empty chunks to the longest, and pooled (B, P) for SDXL."""
        encoded = [self._encode(c) for c in captions]
        chunks = max(e[0].shape[1] for e in encoded)
        empty = self._encode("")[0] if any(e[0].shape[1] < chunks for e in encoded) else None
        hidden = []
        for e, _ in encoded:
            while e.shape[1] < chunks:
                assert empty is not None
                e = torch.cat([e, empty], dim=1)
            hidden.append(e)
        pooled = [p for _, p in encoded if p is not None]
        return torch.cat(hidden), (torch.cat(pooled) if pooled else None)

    def _encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.s.train_text_encoder:  # through the encoders with gradients, every time
            tokens = self.prompt_encoder.tokenize(caption)
            with torch.enable_grad():
                return PromptEncoder.encode_tokenized.__wrapped__(  # type: ignore[attr-defined]
                    self.prompt_encoder, tokens, self.s.clip_skip)
        if caption not in self._texts:
            self._texts[caption] = self.prompt_encoder.encode(caption, self.s.clip_skip)
        return self._texts[caption]

    # --- the loop ------------------------------------------------------------------------------------

    def _train(self, model: LoadedModel, groups: list[dict[str, Any]], total: int) -> TrainingState:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        s = self.s
        self._latents: dict[tuple[int, bool], tuple[torch.Tensor, tuple[int, int]]] = {}
        self._texts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.prompt_encoder = PromptEncoder.from_pipeline(model.pipe)
        noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.prediction_type = noise_scheduler.config.prediction_type
        alphas = noise_scheduler.alphas_cumprod.to(self.device)
        optimizer = _optimizer(s, groups)
        lr_scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=s.lr_warmup_steps,
                                     num_training_steps=total)
        params = [p for g in groups for p in g["params"]]
        self.ema = _Ema(params, s.ema_decay) if s.ema_decay else None
        autocast = _autocast(s.mixed_precision, self.device)
        scaler = torch.amp.GradScaler("cuda") if s.mixed_precision == "fp16" and self.device.type == "cuda" else None

        self.folder.mkdir(parents=True, exist_ok=True)
        step = self._resume(optimizer, lr_scheduler) if s.resume else 0
        write_atomically(self.folder / "settings.json", s.model_dump_json(indent=2).encode())
        self._rewrite_loss_log()
        self.control.start(job_count=1, sampling_steps=total)
        self.state.step = step
        unet = model.unet
        started, start_step = time.monotonic(), step
        try:
            while step < total:
                self.control.check()
                unet.train()
                loss_sum = 0.0
                for k in range(s.gradient_accumulation):
                    loss = self._loss(step * s.gradient_accumulation + k, noise_scheduler, alphas, autocast)
                    loss = loss / s.gradient_accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                    loss_sum += float(loss.detach())
                if scaler:
                    scaler.unscale_(optimizer)
                if s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update()
                step += 1
                self._record(step, loss_sum, lr_scheduler.get_last_lr()[0], started, start_step, total)
                if s.save_every and step % s.save_every == 0 and step < total:
                    self._save(step, optimizer, lr_scheduler, intermediate=True)
                if s.sample_every and s.sample_prompts and step % s.sample_every == 0:
                    self._sample(step)
                if self.on_step:
                    self.on_step(self.state)
        except JobInterrupted:
            self.state.interrupted = True
        self._save(step, optimizer, lr_scheduler, intermediate=False)
        if not self.state.interrupted and s.sample_prompts and (not s.sample_every or step % s.sample_every):
            self._sample(step)
        return self.state

    def _loss(self, number: int, noise_scheduler, alphas: torch.Tensor, autocast) -> torch.Tensor:
        s, model = self.s, self.model
        rng = random.Random(f"{s.seed}-sample-{number}")
        indices = self._micro_batch(number)
        pairs = [self._latent(i, rng) for i in indices]
        latents = torch.cat([p[0] for p in pairs])
        captions = [process_caption(self.items[i].caption, rng, shuffle=s.shuffle_captions,
                                    keep_tokens=s.keep_tokens, dropout=s.caption_dropout) for i in indices]
        hidden, pooled = self._text(captions)
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + number)
        noise = torch.randn(latents.shape, generator=generator)
        if s.noise_offset:
            noise = noise + s.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        dtype = next(model.unet.parameters()).dtype
        kwargs: dict[str, Any] = {}
        if model.is_sdxl:
            assert pooled is not None
            rows = []
            for i, (_, (top, left)) in zip(indices, pairs):
                w, h = self.items[i].size
                bw, bh = self.items[i].bucket
                rows.append([h, w, top, left, bh, bw])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.device, dtype),
                                           "time_ids": torch.tensor(rows, device=self.device, dtype=dtype)}
        with autocast:
            prediction = model.unet(noisy.to(dtype), timesteps, hidden.to(self.device, dtype), **kwargs).sample
        if self.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        elif self.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"checkpoint: prediction type {self.prediction_type!r} cannot be trained")
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        if s.min_snr_gamma:
            snr = alphas[timesteps] / (1 - alphas[timesteps])
            weight = torch.clamp(snr, max=s.min_snr_gamma)
            loss = loss * weight / (snr + 1 if self.prediction_type == "v_prediction" else snr)
        return loss.mean()

    def _record(self, step: int, loss: float, lr: float, started: float, start_step: int, total: int) -> None:
        elapsed = time.monotonic() - started
        rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
        self.state.step, self.state.it_per_s = step, rate
        self.state.eta_seconds = (total - step) / rate if rate > 0 else None
        self.state.losses.append((step, loss))
        with open(self.folder / "loss.csv", "a", newline="") as stream:
            csv.writer(stream).writerow([step, f"{loss:.6f}", f"{lr:.8g}", f"{time.time():.3f}"])
        self.control.update(step=step, textinfo=f"step {step}/{total}, loss {loss:.4f}, {rate:.2f} it/s")

    def _rewrite_loss_log(self) -> None:
        rows = ["step,loss,lr,time"] + [f"{step},{loss:.6f},," for step, loss in self.state.losses]
        write_atomically(self.folder / "loss.csv", ("\n".join(rows) + "\n").encode())

    # --- saving, resuming, samples ------------------------------------------------------------------

    def _metadata(self, step: int) -> dict[str, str]:
        """The kohya ``ss_*`` training metadata both methods write (the LoRA adds its network's)."""
        s, model, report = self.s, self.model, self.state.report
        assert report is not None
        family = model.family.name
        metadata = {
            "ss_output_name": s.name, "ss_base_model_version": _BASE_MODEL_VERSION.get(family, family),
            "ss_v2": str(family == "sd2"), "ss_v_parameterization": str(self.prediction_type == "v_prediction"),
            "ss_resolution": f"({s.resolution}, {s.resolution})", "ss_enable_bucket": "True",
            "ss_tag_frequency": json.dumps(report.tag_frequency()),
            "ss_num_train_images": str(report.images_per_epoch), "ss_steps": str(step),
            "ss_max_train_steps": str(self.state.total_steps),
            "ss_epoch": str(step * s.gradient_accumulation // max(self.batches_per_epoch, 1)),
            "ss_training_started_at": str(self.started_at.timestamp()),
            "ss_training_finished_at": str(time.time()),
            "ss_learning_rate": str(s.learning_rate), "ss_unet_lr": str(s.learning_rate),
            "ss_text_encoder_lr": str(s.text_encoder_lr or s.learning_rate) if s.train_text_encoder else "0",
            "ss_lr_scheduler": s.lr_scheduler, "ss_lr_warmup_steps": str(s.lr_warmup_steps),
            "ss_optimizer": s.optimizer, "ss_batch_size_per_device": str(s.batch_size),
            "ss_gradient_accumulation_steps": str(s.gradient_accumulation),
            "ss_gradient_checkpointing": str(s.gradient_checkpointing), "ss_mixed_precision": s.mixed_precision,
            "ss_min_snr_gamma": str(s.min_snr_gamma), "ss_noise_offset": str(s.noise_offset), "ss_seed": str(s.seed),
            "ss_clip_skip": str(s.clip_skip), "ss_shuffle_caption": str(s.shuffle_captions),
            "ss_keep_tokens": str(s.keep_tokens), "ss_caption_dropout_rate": str(s.caption_dropout),
            "ss_flip_aug": str(s.flip), "ss_random_crop": str(s.crop == "random"),
            "ss_sd_model_name": model.file.path.name,
        }
        if s.ema_decay:
            metadata["ss_ema_decay"] = str(s.ema_decay)
        if model.file.path.is_file():
            from pipelines.models.hashes import legacy_hash

            metadata["ss_sd_model_hash"] = legacy_hash(model.file.path)
            sha = getattr(model.file, "sha256", None)
            if isinstance(sha, str) and sha:
                metadata["ss_new_sd_model_hash"] = sha
        return metadata

    def _save(self, step: int, optimizer, lr_scheduler, *, intermediate: bool) -> None:
        """The method's output file(s) (with the EMA weights when kept), the settings beside them, and the
        resume state; every file written atomically."""
        final = output_path(self.engine, self.s)
        paths = [output_path(self.engine, self.s, step)] if intermediate else []
        if not intermediate:
            paths.append(final)
        with self.ema.applied() if self.ema is not None else nullcontext():
            self.method.write(paths, self._metadata(step))
        self.state.saves.extend(paths)
        write_atomically(final.with_suffix(".train.json"), self.s.model_dump_json(indent=2).encode())
        state = {"step": step, "weights": self.method.weights(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_scheduler.state_dict(), "losses": [[st, lo] for st, lo in self.state.losses],
                 "settings": self.s.model_dump(mode="json"),
                 **({"ema": self.ema.state_dict()} if self.ema is not None else {})}
        with atomic_output(self.folder / "train-state.pt") as handle:  # streamed: a fine-tune's state is large
            torch.save(state, handle)
        if not intermediate:
            self.state.output = final

    def _resume(self, optimizer, lr_scheduler) -> int:
        path = self.folder / "train-state.pt"
        if not path.is_file():
            raise ValueError(f"resume: no saved state for {self.s.name!r} (looked for {path})")
        state = read_weights_raw(path)
        if not isinstance(state, dict):
            raise ValueError(f"resume: {path} does not hold a saved training state")
        saved = state.get("settings", {})
        fields = TrainingSettings.model_fields
        changed = [name for name in SHAPE_FIELDS if saved.get(name, fields[name].default) != getattr(self.s, name)]
        if changed:
            raise ValueError(f"resume: {', '.join(changed)} differ from the saved run; keep them to resume")
        self.method.load(state["weights"] if "weights" in state else state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.state.losses = [(int(st), float(lo)) for st, lo in state["losses"]]
        return int(state["step"])

    def _sample(self, step: int) -> None:
        s = self.s
        size = s.sample_size or s.resolution
        samples = self.folder / "samples"
        unet = self.model.unet
        unet.eval()
        with self.ema.applied() if self.ema is not None else nullcontext():
            self._sample_prompts(step, size, samples)

    def _sample_prompts(self, step: int, size: int, samples: Path) -> None:
        s = self.s
        method = "LoRA training" if s.method == "lora" else "Fine-tune"
        for number, prompt in enumerate(s.sample_prompts):
            request = GenerationRequest(prompt=prompt, checkpoint=self.model.file.title, seed=s.sample_seed,
                                        steps=s.sample_steps, width=size, height=size, save_images=False)
            result = self.engine.generate(request, control=JobControl(), local=True)
            image, infotext = result.images[0], result.infotexts[0]
            infotext += f", {method}: {s.name} step {step}"
            path = samples / f"step{step:08d}-{number:02d}.png"
            write_atomically(path, embed_infotext(image, infotext, "png"))
            self.state.samples.append(SampleImage(step, prompt, path, image, infotext))


class _Method:
    """What a training method decides: which parameters train, what a save writes, what resume restores."""

    def __init__(self, run: _Run):
        self.run, self.s, self.model = run, run.s, run.model

    def check(self) -> None:
        """Refuse, before any model work, what this method cannot do here (ValueError naming the field)."""

    def add(self) -> list[dict[str, Any]]:
        """Make the model trainable; returns the optimizer's parameter groups."""
        raise NotImplementedError

    def remove(self) -> None:
        """Undo :meth:`add`, whatever happened in between."""
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained weights by key, on the CPU (the resume state)."""
        raise NotImplementedError

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def write(self, paths: list[Path], metadata: dict[str, str]) -> None:
        """Write the output file at each of ``paths``, atomically."""
        raise NotImplementedError


class _Lora(_Method):
    def add(self) -> list[dict[str, Any]]:
        s = self.s
        groups = [{"params": lora.add_adapter(self.model.unet, s.rank, s.alpha, TARGETS[s.targets]),
                   "lr": s.learning_rate}]
        if s.train_text_encoder:
            for encoder in self.run.encoders:
                groups.append({"params": lora.add_adapter(encoder, s.rank, s.alpha, TEXT_ENCODER_TARGETS),
                               "lr": s.text_encoder_lr or s.learning_rate})
        return groups

    def remove(self) -> None:
        for m in (self.model.unet, *self.run.encoders):
            lora.remove_adapter(m)
            m.eval()

    def _parts(self) -> dict[str, dict[str, torch.Tensor]]:
        parts = {"lora_unet_": lora.adapter_weights(self.model.unet)}
        if self.s.train_text_encoder:
            prefixes = ["lora_te1_", "lora_te2_"] if self.model.is_sdxl else ["lora_te_"]
            for prefix, encoder in zip(prefixes, self.run.encoders):
                parts[prefix] = lora.adapter_weights(encoder)
        return parts

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"{p}{k}": v for p, w in self._parts().items() for k, v in w.items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        encoders = self.run.encoders
        first, second = (encoders + [None, None])[:2]
        for prefix, module in [("lora_unet_", self.model.unet), ("lora_te_", first), ("lora_te1_", first),
                               ("lora_te2_", second)]:
            own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            if own and module is not None:
                lora.load_adapter_weights(module, own)

    def write(self, paths: list[Path], metadata: dict[str, str]) -> None:
        s = self.s
        # kohya names text encoder layers after CLIPTextModel's full path (text_model.encoder.layers...).
        parts = {prefix: {(k if prefix == "lora_unet_" or k.startswith("text_model.") else "text_model." + k): v
                          for k, v in weights.items()} for prefix, weights in self._parts().items()}
        tensors = lora.kohya_state_dict(parts, s.alpha, _SAVE_DTYPES[s.save_precision])
        metadata = {
            **metadata, "ss_network_module": "networks.lora", "ss_network_dim": str(s.rank),
            "ss_network_alpha": str(s.alpha), "ss_network_args": json.dumps(
                {"conv_dim": str(s.rank), "conv_alpha": str(s.alpha)} if s.targets.endswith("conv") else {}),
            "ss_network_train_unet_only": str(not s.train_text_encoder),
        }
        for path in paths:
            lora.write_lora(path, tensors, metadata)


class _FineTune(_Method):
    """Every weight of the UNet (and text encoders) trains, in float32; the loaded weights come back after."""

    def _trained(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.model.unet}
        if self.s.train_text_encoder:
            modules.update(zip(("text_encoder", "text_encoder_2"), self.run.encoders))
        return modules

    def check(self) -> None:
        check_output(self.run.engine, self.s, self.model.file.path)

    def add(self) -> list[dict[str, Any]]:
        s = self.s
        self.saved: list[tuple[torch.nn.Module, torch.dtype, dict[str, torch.Tensor]]] = []
        groups = []
        for name, module in self._trained().items():
            dtype = next(module.parameters()).dtype
            self.saved.append((module, dtype, {k: v.detach().to("cpu", copy=True)
                                               for k, v in module.state_dict().items()}))
            module.to(torch.float32)
            module.requires_grad_(True)
            lr = s.learning_rate if name == "unet" else s.text_encoder_lr or s.learning_rate
            groups.append({"params": [p for p in module.parameters()], "lr": lr})
        return groups

    def remove(self) -> None:
        for module, dtype, state in getattr(self, "saved", []):
            module.to(dtype)
            module.load_state_dict(state)
            module.eval()
        self.saved = []

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().to("cpu") for name, module in self._trained().items()
                for k, v in module.state_dict().items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        for name, module in self._trained().items():
            own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
            try:
                module.load_state_dict(own)
            except RuntimeError as error:
                raise ValueError(f"resume: the saved {name} weights do not fit this model: {error}") from None

    def write(self, paths: list[Path], metadata: dict[str, str]) -> None:
        run, model, s = self.run, self.model, self.s
        components = {"unet": model.unet, "vae": model.own_vae, "text_encoder": model.pipe.text_encoder}
        if model.is_sdxl:
            components["text_encoder_2"] = model.pipe.text_encoder_2
        entries = original_entries(model.family.name, components, prediction_type=run.prediction_type)
        metadata = {**metadata, "format": "pt", "ss_training_method": "fine-tune",
                    TRAINING_METADATA: s.model_dump_json()}
        sidecar = _sidecar(model)
        for path in paths:
            write_checkpoint(path, entries, dtype=_SAVE_DTYPES[s.save_precision], metadata=metadata)
            if sidecar is not None:
                write_atomically(path.with_suffix(".yaml"), sidecar)
        run.engine.registry.refresh()


def _is_training_output(path: Path) -> bool:
    from pipelines.models.weights import read_safetensors_header

    try:
        metadata, _ = read_safetensors_header(path)
    except (ValueError, OSError):
        return False
    return TRAINING_METADATA in metadata


def _sidecar(model: LoadedModel) -> bytes | None:
    """The sidecar ``.yaml`` a fine-tuned checkpoint needs: the base file's own, or, for a model whose configs
    differ from the family's shipped ones (a diffusers folder of another size), a ``diffusers:`` mapping of the
    differences. None when the file alone says everything (then A1111 finds no sidecar either)."""
    import yaml

    from pipelines.models.checkpoints import CONFIG_FILES, FAMILY_CONFIG_DIRS

    path = model.file.path
    if path.is_file() and path.with_suffix(".yaml").is_file():
        return path.with_suffix(".yaml").read_bytes()
    shipped_dir = FAMILY_CONFIG_DIRS[model.family.name]
    overrides = {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module: Any = model.own_vae if component == "vae" else getattr(model.pipe, component, None)
        shipped_file = shipped_dir / CONFIG_FILES[component]
        if module is None or not shipped_file.is_file():
            continue
        shipped = json.loads(shipped_file.read_text(encoding="utf-8"))
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        different = {k: v for k, v in config.items() if k in shipped and not k.startswith("_")
                     and _plain(v) != _plain(shipped[k])}
        if different:
            overrides[component] = {k: _plain(v) for k, v in different.items()}
    if not overrides:
        return None
    return yaml.safe_dump({"diffusers": overrides}, sort_keys=False).encode()


def _plain(value: Any) -> Any:
    """Config values as YAML/JSON hold them (tuples as lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Ema:
    """An exponential moving average of the trained parameters (float32), with diffusers' warm-up
    (decay ``min(decay, (1 + n) / (10 + n))`` at update ``n``); :meth:`applied` swaps it in for saves and samples."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            kept = param.data
            param.data = shadow.to(kept.dtype) if shadow.dtype != kept.dtype else shadow
            shadow.data = kept.float() if kept.dtype != torch.float32 else kept

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": [s.detach().to("cpu") for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("resume: the saved EMA does not match this run's trained weights")
        self.updates = int(state["updates"])
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)


def _optimizer(s: TrainingSettings, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if s.optimizer == "AdamW8bit":
        try:
            import bitsandbytes  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError("optimizer: AdamW8bit needs the bitsandbytes package; allowed here: AdamW") from None
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=s.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=s.weight_decay)


def _autocast(precision: str, device: torch.device):
    if precision == "no" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def loss_curve(losses: list[tuple[int, float]]) -> dict[str, list]:
    """Loss history as columns (for plots and the API)."""
    return {"step": [st for st, _ in losses], "loss": [lo for _, lo in losses]}


__all__ = ["TRAINING_METADATA", "SampleImage", "TrainingState", "check_output", "checkpoint_path", "loss_curve",
           "lora_path", "output_path", "run_folder", "train"]
