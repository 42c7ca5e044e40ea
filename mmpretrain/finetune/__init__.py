"""Downstream tasks on pretrained towers: linear probe, full fine-tuning, multimodal fusion (``tasks``),
visual question answering (``vqa``) and a caption decoder (``caption``: ``task=caption``, its own entry
point ``caption.run``).

``run(task_cfg, model, data_cfg, trainer_cfg, run_dir)`` is the one entry point (``mmpretrain finetune``).
May import everything below ``commands`` (``training`` for the datamodule, loggers and schedule).
"""

from mmpretrain.finetune.tasks import run

__all__ = ["run"]
