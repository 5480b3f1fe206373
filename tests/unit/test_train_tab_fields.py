"""The Train tab's controls come from TrainingSettings' declarations, and their values go back into it."""

from __future__ import annotations

import gradio as gr
import pytest

from pipelines.training.settings import TrainingSettings
from webui.ui import fields
from webui.ui.train import CHECKPOINT, method_learning_rate, progress_html, setting_names, settings_from


def test_every_setting_has_exactly_one_control():
    names = setting_names()
    assert len(names) == len(set(names))
    assert set(names) | {CHECKPOINT} == set(TrainingSettings.model_fields)


def test_controls_follow_the_declarations():
    with gr.Blocks():
        built = {name: fields.control(TrainingSettings, name, name) for name in setting_names()}
    assert isinstance(built["flip"], gr.Checkbox) and built["flip"].value is False
    assert isinstance(built["lr_scheduler"], gr.Dropdown)
    assert [choice[1] for choice in built["lr_scheduler"].choices][:2] == ["constant", "constant_with_warmup"]
    rank = built["rank"]
    assert isinstance(rank, gr.Number) and (rank.minimum, rank.maximum, rank.value, rank.precision) == (1, 1024, 16, 0)
    assert rank.info == "LoRA rank (network dim)" and built["text_encoder_lr"].info.endswith("(0: none)")
    assert built["learning_rate"].precision is None and built["learning_rate"].value == 1e-4
    assert built["name"].value == "" and built["dataset"].value == ""  # required: no default, an empty box
    assert isinstance(built["sample_prompts"], gr.Textbox) and built["sample_prompts"].lines == 3


def test_values_go_back_into_the_settings_and_bad_ones_name_the_field():
    saved = TrainingSettings(name="run", dataset="pictures", sample_prompts=["a cat", "a dog"], text_encoder_lr=None)
    shown = {name: fields.control_value(TrainingSettings, name, getattr(saved, name)) for name in setting_names()}
    assert shown["sample_prompts"] == "a cat\na dog"
    assert settings_from({**shown, CHECKPOINT: None}) == saved
    assert settings_from({**shown, "text_encoder_lr": "", "sample_prompts": " \n a\n"}).sample_prompts == ["a"]
    with pytest.raises(ValueError, match=r"rank: Input should be greater than or equal to 1"):
        settings_from({**shown, "rank": 0})


def test_the_progress_line():
    state = {"status": "running", "step": 3, "total_steps": 10, "it_per_s": 1.5, "eta_seconds": 4.7,
             "losses": {"step": [1, 2, 3], "loss": [0.3, 0.2, 0.125]}, "output": None, "error": None}
    assert "running · step 3/10 · 1.50 it/s · ETA 0:00:05 · loss 0.1250" in progress_html(state)
    failed = progress_html({**state, "status": "failed", "error": "dataset: <none>"})
    assert "sdui-error" in failed and "dataset: &lt;none&gt;" in failed


def test_a_cleared_optional_number_is_none():
    shown = {name: fields.control_value(TrainingSettings, name, getattr(
        TrainingSettings(name="run", dataset="d"), name)) for name in setting_names()}
    assert settings_from({**shown, "text_encoder_lr": 0}).text_encoder_lr is None
    assert settings_from({**shown, "text_encoder_lr": 0.5}).text_encoder_lr == 0.5


def test_the_method_choice_and_its_learning_rate():
    with gr.Blocks():
        method = fields.control(TrainingSettings, "method", "method")
    assert isinstance(method, gr.Dropdown) and [c[1] for c in method.choices] == ["lora", "fine-tune"]
    assert method_learning_rate("fine-tune", 1e-4) == 1e-5 and method_learning_rate("lora", 1e-5) == 1e-4
    assert method_learning_rate("fine-tune", 3e-6) is None  # the user's own value stays
