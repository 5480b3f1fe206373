"""Training on the engine's loaded models: datasets (dataset.py), settings (settings.py), LoRA layers and the
kohya file format (lora.py), the training loop with saves, resume and samples (trainer.py), runs for a job
queue (runs.py)."""
