"""The settings of one training run: every field typed, bounded and documented once; the API body and the
Train tab are built from it, and a run's settings are saved beside its output as JSON."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.training.dataset import BUCKET_STEP

TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "attention+ff+conv": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "conv1", "conv2", "conv_shortcut"),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
METHODS = ("lora", "fine-tune")
#: Fields that change the shape or meaning of what is trained: a resume must keep them.
SHAPE_FIELDS = ("method", "rank", "alpha", "targets", "train_text_encoder", "checkpoint", "seed", "ema_decay")
#: The learning rate when none is given: a full fine-tune moves every weight, so it takes a smaller one.
DEFAULT_LEARNING_RATES = {"lora": 1e-4, "fine-tune": 1e-5}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


class TrainingSettings(BaseModel):
    """One training run: a LoRA, or a full fine-tune of the UNet (and text encoders) into a new checkpoint."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Output name: models/Lora/<name>.safetensors, or for a fine-tune "
                                  "models/Stable-diffusion/<name>.safetensors (letters, digits, space . _ -)")
    dataset: str = Field(description="Folder of images with captions, inside the data folder")
    checkpoint: str | None = Field(None, description="Base checkpoint (title, name or hash); default: current")
    method: Literal[METHODS] = Field(  # type: ignore[valid-type]
        "lora", description="lora: a LoRA file; fine-tune: every UNet weight (and the text encoders' when "
                            "trained), saved as a new checkpoint")
    resolution: int = Field(512, ge=BUCKET_STEP, le=4096, multiple_of=BUCKET_STEP,
                            description="Target side: buckets have about resolution² pixels")
    batch_size: int = Field(1, ge=1, le=64)
    steps: int = Field(1000, ge=0, le=1_000_000, description="Optimizer steps; 0 = use epochs")
    epochs: int = Field(0, ge=0, le=10_000, description="Passes over the dataset (when steps is 0)")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="Left out: 1e-4 for lora, 1e-5 for fine-tune")
    text_encoder_lr: float | None = Field(None, gt=0, le=1.0, description="Text encoder LR; default: learning_rate")
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(0, ge=0)
    optimizer: Literal["AdamW", "AdamW8bit"] = Field("AdamW", description="AdamW8bit needs CUDA and bitsandbytes")
    weight_decay: float = Field(1e-2, ge=0, le=1)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 = off")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank (network dim)")
    alpha: float = Field(16.0, gt=0, le=4096, description="LoRA alpha; the scale is alpha / rank")
    targets: Literal["attention", "attention+ff", "attention+ff+conv"] = Field(
        "attention", description="UNet modules trained: attention, + feed-forward, + convolutions (LoCon)")
    train_text_encoder: bool = Field(False, description="Train the text encoder(s) too")
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast on CUDA only")
    min_snr_gamma: float = Field(0.0, ge=0, description="Min-SNR loss weighting; 0 = off (5 is usual)")
    noise_offset: float = Field(0.0, ge=0, le=1)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    clip_skip: int = Field(1, ge=1, le=12)
    crop: Literal["center", "random"] = "center"
    flip: bool = Field(False, description="Random horizontal flip")
    shuffle_captions: bool = False
    keep_tokens: int = Field(0, ge=0, description="Leading caption tags kept in place when shuffling")
    caption_dropout: float = Field(0.0, ge=0, le=1)
    missing_captions: Literal["skip", "file name"] = "skip"
    save_every: int = Field(0, ge=0, description="Intermediate LoRA / checkpoint and resume state every N steps; "
                                                 "0 = end only")
    save_precision: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Dtype of the saved weights")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="Keep an EMA of the trained weights (e.g. 0.999) and "
                                                          "save and sample it; 0 = off")
    sample_every: int = Field(0, ge=0, description="Sample images every N steps; 0 = off")
    sample_prompts: list[str] = Field(default_factory=list)
    sample_seed: int = Field(1234, ge=0, le=2**32 - 1)
    sample_steps: int = Field(20, ge=1, le=150)
    sample_size: int = Field(0, ge=0, le=4096, description="Sample width and height; 0 = resolution")
    resume: bool = Field(False, description="Continue from the run's last save (same name and settings)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _NAME.match(value) or value.endswith((".", " ")):
            raise ValueError("must be 1-100 letters, digits, spaces, '.', '_' or '-', not ending in '.' or ' '")
        return value

    @model_validator(mode="after")
    def _method_learning_rate(self) -> TrainingSettings:
        if "learning_rate" not in self.model_fields_set:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.method]
        return self

    @field_validator("sample_prompts")
    @classmethod
    def _no_empty_prompts(cls, value: list[str]) -> list[str]:
        return [prompt for prompt in value if prompt.strip()]
