"""Evaluation: compare checkpoints, LoRAs and settings on a prompt set with standard metrics.

- :mod:`pipelines.evaluation.prompts`: the built-in prompt set, .txt / .csv prompt files.
- :mod:`pipelines.evaluation.metrics`: CLIP score, FID, KID, Inception Score (torchmetrics / torch-fidelity),
  SSIM and PSNR (scikit-image).
- :mod:`pipelines.evaluation.runner`: :func:`run_evaluation` (generate, save, score) and :func:`score_run`
  (re-score an existing run folder).
- :mod:`pipelines.evaluation.report`: the table, bar chart, contact sheets, CSV and JSON.
"""
