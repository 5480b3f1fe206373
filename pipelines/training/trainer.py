"""The training loop: a LoRA on the engine's loaded model, from a checked dataset, with saves, resume,
progress, a loss log and sample images.

Everything random is drawn from the seed and the step number (data order per epoch, crops, flips,
captions, noise, timesteps), so a run stopped at step k and resumed from its save ends with the same
weights as a run that never stopped. The model is the one the engine generates with: the adapter is
added for the run and taken out afterwards, whatever happens.

Files of a run named ``NAME``:

- ``models/Lora/NAME.safetensors`` (the LoRA, kohya keys and ``ss_*`` metadata), ``NAME-stepNNNNNNNN.safetensors``
  for intermediate saves, ``NAME.train.json`` (the settings);
- ``outputs/train/NAME/``: ``settings.json``, ``loss.csv``, ``train-state.pt`` (LoRA weights, optimizer,
  LR schedule, step, loss history: what resume reads), ``samples/`` (PNG with infotext).
"""

from __future__ import annotations

import csv
import io
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

from pipelines.files import write_atomically
from pipelines.images.saving import embed_infotext
from pipelines.job_control import JobControl, JobInterrupted
from pipelines.models.weights import read_weights_raw
from pipelines.prompts.encoding import PromptEncoder
from pipelines.request import GenerationRequest
from pipelines.sampling.latents import encode, pil_to_tensor
from pipelines.training import lora
from pipelines.training.dataset import DatasetReport, fit_to_bucket, process_caption, scan_dataset
from pipelines.training.settings import SHAPE_FIELDS, TARGETS, TEXT_ENCODER_TARGETS, TrainingSettings

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
        if s.method != "lora":
            raise ValueError(f"method: {s.method} is not supported; allowed: lora")
        self.items = report.items
        self.batches_per_epoch = self._epoch_batches(0).__len__()
        total = s.steps or s.epochs * math.ceil(self.batches_per_epoch / s.gradient_accumulation)
        self.state.total_steps = total
        model = self.engine.models.get(s.checkpoint)
        self.model = model
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
            groups = [{"params": lora.add_adapter(model.unet, s.rank, s.alpha, TARGETS[s.targets]),
                       "lr": s.learning_rate}]
            if s.train_text_encoder:
                for encoder in self.encoders:
                    groups.append({"params": lora.add_adapter(encoder, s.rank, s.alpha, TEXT_ENCODER_TARGETS),
                                   "lr": s.text_encoder_lr or s.learning_rate})
            if checkpointing:
                model.unet.enable_gradient_checkpointing()
            yield groups
        finally:
            if checkpointing:
                model.unet.disable_gradient_checkpointing()
            for m in (model.unet, *self.encoders):
                lora.remove_adapter(m)
                m.eval()
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

    def _parts(self) -> dict[str, dict[str, torch.Tensor]]:
        parts = {"lora_unet_": lora.adapter_weights(self.model.unet)}
        if self.s.train_text_encoder:
            prefixes = ["lora_te1_", "lora_te2_"] if self.model.is_sdxl else ["lora_te_"]
            for prefix, encoder in zip(prefixes, self.encoders):
                parts[prefix] = lora.adapter_weights(encoder)
        return parts

    def _metadata(self, step: int) -> dict[str, str]:
        s, model, report = self.s, self.model, self.state.report
        assert report is not None
        family = model.family.name
        metadata = {
            "ss_output_name": s.name, "ss_network_module": "networks.lora", "ss_network_dim": str(s.rank),
            "ss_network_alpha": str(s.alpha), "ss_network_args": json.dumps(
                {"conv_dim": str(s.rank), "conv_alpha": str(s.alpha)} if s.targets.endswith("conv") else {}),
            "ss_base_model_version": _BASE_MODEL_VERSION.get(family, family),
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
            "ss_network_train_unet_only": str(not s.train_text_encoder),
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
        if model.file.path.is_file():
            from pipelines.models.hashes import legacy_hash

            metadata["ss_sd_model_hash"] = legacy_hash(model.file.path)
            sha = getattr(model.file, "sha256", None)
            if isinstance(sha, str) and sha:
                metadata["ss_new_sd_model_hash"] = sha
        return metadata

    def _save(self, step: int, optimizer, lr_scheduler, *, intermediate: bool) -> None:
        """The LoRA file(s), the settings beside it, and the resume state; every file written atomically."""
        # kohya names text encoder layers after CLIPTextModel's full path (text_model.encoder.layers...).
        parts = {prefix: {(k if prefix == "lora_unet_" or k.startswith("text_model.") else "text_model." + k): v
                          for k, v in weights.items()} for prefix, weights in self._parts().items()}
        tensors = lora.kohya_state_dict(parts, self.s.alpha)
        metadata = self._metadata(step)
        final = lora_path(self.engine, self.s.name)
        paths = [lora_path(self.engine, self.s.name, step)] if intermediate else []
        if not intermediate:
            paths.append(final)
        for path in paths:
            lora.write_lora(path, tensors, metadata)
            self.state.saves.append(path)
        settings = self.s.model_dump_json(indent=2).encode()
        write_atomically(final.with_suffix(".train.json"), settings)
        buffer = io.BytesIO()
        torch.save({"step": step, "lora": {f"{p}{k}": v for p, w in self._parts().items() for k, v in w.items()},
                    "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "losses": [[st, lo] for st, lo in self.state.losses],
                    "settings": self.s.model_dump(mode="json")}, buffer)
        write_atomically(self.folder / "train-state.pt", buffer.getvalue())
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
        changed = [name for name in SHAPE_FIELDS if saved.get(name) != getattr(self.s, name)]
        if changed:
            raise ValueError(f"resume: {', '.join(changed)} differ from the saved run; keep them to resume")
        for prefix, module in [("lora_unet_", self.model.unet), ("lora_te_", self._encoder(0)),
                               ("lora_te1_", self._encoder(0)), ("lora_te2_", self._encoder(1))]:
            weights = {k[len(prefix):]: v for k, v in state["lora"].items() if k.startswith(prefix)}
            if weights and module is not None:
                lora.load_adapter_weights(module, weights)
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.state.losses = [(int(st), float(lo)) for st, lo in state["losses"]]
        return int(state["step"])

    def _encoder(self, index: int):
        return self.encoders[index] if index < len(self.encoders) else None

    def _sample(self, step: int) -> None:
        s = self.s
        size = s.sample_size or s.resolution
        samples = self.folder / "samples"
        unet = self.model.unet
        unet.eval()
        for number, prompt in enumerate(s.sample_prompts):
            request = GenerationRequest(prompt=prompt, checkpoint=self.model.file.title, seed=s.sample_seed,
                                        steps=s.sample_steps, width=size, height=size, save_images=False)
            result = self.engine.generate(request, control=JobControl())
            image, infotext = result.images[0], result.infotexts[0]
            infotext += f", LoRA training: {s.name} step {step}"
            path = samples / f"step{step:08d}-{number:02d}.png"
            write_atomically(path, embed_infotext(image, infotext, "png"))
            self.state.samples.append(SampleImage(step, prompt, path, image, infotext))


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


__all__ = ["SampleImage", "TrainingState", "loss_curve", "lora_path", "run_folder", "train"]
