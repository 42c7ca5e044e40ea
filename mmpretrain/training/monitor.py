"""Lightning callbacks for what a user sees of a run: step statistics and PNG plots.

``WandbLogger`` closes its wandb run at the end of fit. ``StepStats`` logs what the module does not: the
fraction of each step spent waiting for data and
the temperature(s). ``RunPlots`` draws ``<run>/plots/*.png`` at the end of training (and logs
them to wandb): curves from ``metrics.csv``, a similarity heatmap of val samples vs class prompts
and a 2-D projection of the val embeddings. The drawing itself is :mod:`mmpretrain.training.plots`.
``ProgressBar`` redraws every N steps (reading the displayed metrics is a host sync), counting
epochs from one; ``ModelSummary`` is Lightning's start-up table without its FLOPs column;
``CountHostSyncs`` (debug) counts the host reads of tensors made in each training step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from mmpretrain.evaluation import class_embeddings
from mmpretrain.io import write_text_atomic
from mmpretrain.training import plots


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger that also closes its wandb run when fit ends (marked failed when
    training raised), so each run of a sweep in one process gets its own wandb run.

    ``mode=offline`` (our default) is made wandb's process-wide mode too (``WANDB_MODE``), as
    Lightning does for its own ``offline=True``: wandb otherwise starts OpenTelemetry exporters
    from its process-wide settings, which send usage data from an offline run (and, with no
    network, try to until their timeout)."""

    # : set while a ``trainer.validate`` runs before ``fit`` (the step-0 baseline): its end must not end the
    # run
    keep_open: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning keeps wandb.init's arguments in a private attribute, with no public way to drop one.
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init[
                "anonymous"
            ]  # wandb warns at every start that the unset setting has no effect
        mode = self._wandb_init.get("mode")
        if mode in ("offline", "disabled"):
            os.environ["WANDB_MODE"] = mode

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if (
            self._experiment is not None
            and status in ("success", "failed")
            and not (self.keep_open and status == "success")
        ):
            self._experiment.finish(exit_code=0 if status == "success" else 1)
            self._experiment = None


@contextmanager
def one_wandb_run(loggers: list) -> Iterator[None]:
    """Keep our :class:`WandbLogger`'s run open through a ``trainer.validate`` before ``fit``, so the
    step-0 baseline and the training land in one wandb run."""
    ours = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    for lg in ours:
        lg.keep_open = True
    try:
        yield
    finally:
        for lg in ours:
            lg.keep_open = False


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger writing ``metrics.csv`` into the run directory, which already holds the
    run's ``config.yaml``: it does not warn that the directory is not empty, and when the run
    resumes (``resuming=True``, set by ``mmpretrain train`` for ``resume=``) it appends to the
    existing ``metrics.csv`` instead of deleting the history before the resume, first dropping the rows
    logged at or after the checkpoint's step (``resume_step``), which the resumed run logs again."""

    resuming: bool = False
    resume_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunDirWriter(
                log_dir=self.log_dir, keep=self.resuming, before=self.resume_step
            )
        return self._experiment


class _RunDirWriter(ExperimentWriter):
    """Lightning's CSV writer with its check of an existing ``metrics.csv`` replaced (a private hook:
    Lightning offers no option to keep or append; tests/unit/test_private_apis.py watches it)."""

    def __init__(self, log_dir: str, keep: bool, before: int | None = None) -> None:
        self._keep, self._before = keep, before
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        if not self._keep:  # a new run in an old directory starts a new history
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        self.metrics_keys = sorted(header)
        if self._before is None:
            return
        # The rows logged at or after the checkpoint's step: the resumed run logs those steps again.
        kept = [r for r in rows if not (r.get("step") or "").isdigit() or int(r["step"]) < self._before]
        if len(kept) < len(rows):
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
            write_text_atomic(self.metrics_file_path, out.getvalue())


class StepStats(L.Callback):
    """At the steps that write logs (the module's step log): ``train/data_wait_frac``, over the steps
    since the last log, the time from the end of one batch to the start of the next (the loader's
    wait, as the loop sees it) over the start-to-start step time, from host clocks; and
    ``train/temperature/<k>`` = 1 / exp(log s), in the step log's one host read. Intervals that
    span a validation are not counted."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._end: float | None = None
        self._wait = self._total = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._start is not None and self._end is not None and now > self._start:
            self._wait, self._total = self._wait + now - self._end, self._total + now - self._start
        self._start = now

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        steplog = getattr(pl_module, "steplog", None)
        if steplog is None or not steplog.due:
            return
        if self._total > 0:
            steplog.log({"train/data_wait_frac": self._wait / self._total})
            self._wait = self._total = 0.0
        names = list(pl_module.model.logit_scales)
        scales = torch.stack([v.detach().reshape(()) for v in pl_module.model.logit_scales.values()])
        steplog.read(scales, lambda v: {f"train/temperature/{k}": math.exp(-x) for k, x in zip(names, v)})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._end = None


class ProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, redrawn every ``refresh_every`` training steps (and at the end
    of an epoch), showing the logged ``metrics`` it finds.

    Shown values are read on the host (a GPU sync). Lightning converts every ``self.log(...,
    prog_bar=True)`` tensor to a number after every batch, whether shown or not, so the module logs
    nothing with ``prog_bar``; this bar reads its ``metrics`` from ``trainer.callback_metrics`` when
    it redraws, and only then."""

    def __init__(
        self,
        refresh_every: int = 10,
        metrics: tuple[str, ...] = ("train/loss", "train/samples_per_s"),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.refresh_every = max(1, int(refresh_every))
        self.metrics = list(metrics)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        shown = super().get_metrics(trainer, pl_module)
        shown.pop("v_num", None)  # the logger's version (a wandb id): the run directory names the run
        # the host values of the last step that logged, where the module keeps them (no tensor read)
        logged = getattr(getattr(pl_module, "steplog", None), "last", None) or trainer.callback_metrics
        return shown | {k: float(logged[k]) for k in self.metrics if k in logged}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._count_epochs_from_one(trainer)

    def _count_epochs_from_one(self, trainer: L.Trainer) -> None:
        """Lightning labels the bar ``Epoch 1/1`` on the second of two epochs (0-based, the last index);
        the label becomes ``Epoch 2/2``, the way users count (``Epoch 2`` when no epoch count is set)."""
        if self.progress is None or self.train_progress_bar_id is None:
            return
        label = f"Epoch {trainer.current_epoch + 1}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            label += f"/{trainer.max_epochs}"
        label = f"{label:{len(self.validation_description)}}"  # as wide as the val bar's: no flicker
        style = self.theme.description
        self.progress.update(self.train_progress_bar_id, description=f"[{style}]{label}" if style else label)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % self.refresh_every == 0 or trainer.is_last_batch:
            # After a mid-epoch resume Lightning makes the bar here, not at the epoch's start.
            created = self.train_progress_bar_id is None
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if created:
                self._count_epochs_from_one(trainer)


class ModelSummary(RichModelSummary):
    """Lightning's start-up table of the module's children (name, type, parameters, mode) and the
    parameter totals, without the FLOPs column: Lightning counts FLOPs only by running the module's
    ``example_input_array``, which a contrastive module (a batch is a dict of modalities) does not
    have, so it printed ``Total FLOPs: 0``. ``make bench`` measures FLOPs per step and MFU."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from lightning.pytorch.utilities.model_summary import get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = dict(summary_data)
        if not total_flops:
            columns.pop("FLOPs", None)
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name in columns:
            table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left")
        for row in zip(*columns.values()):
            table.add_row(*row)
        console = get_console()
        console.print(table)

        def count(n: float) -> str:
            return get_human_readable_count(int(n)).strip()

        lines = [
            f"Trainable params: {count(trainable_parameters)}",
            f"Non-trainable params: {count(total_parameters - trainable_parameters)}",
            f"Total params: {count(total_parameters)} ({model_size:,.1f} MB)",
            f"Modules in train mode: {total_training_modes['train']}, "
            f"in eval mode: {total_training_modes['eval']}",
        ]
        if total_flops:
            lines.append(f"Total FLOPs (example input): {count(total_flops)}")
        console.print("\n".join(lines), highlight=False)


#: The tensor methods that read a value on the host (for a device tensor: wait for the device).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class CountHostSyncs(L.Callback):
    """Debug: count the host reads of tensors (:data:`HOST_READS`) per training step, in this
    process's main thread, and write ``<dirpath>/rank<R>.json`` ({step: {method: count}}) at the
    end of training. A call is charged to the training batch fetched last (1 = the first batch;
    the loop's work after a batch, logging included, belongs to that batch; work before a batch's
    hooks, e.g. a callback's ``on_train_batch_start``, to the batch about to run). On CPU a read
    is no real sync, but each one would be on a GPU."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.counts: dict[int, Counter] = {}
        self._training = False
        self._saved: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pid, main = os.getpid(), threading.main_thread()
        progress = trainer.fit_loop.epoch_loop.batch_progress.total
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = torch.Tensor.__dict__.get(name)  # None: inherited from the C base

            def counted(t, *args, __name=name, __original=original, **kwargs):
                # trainer.training: not the validation loop (nor its loader's start, which reads a seed)
                if (
                    self._training
                    and trainer.training
                    and os.getpid() == pid
                    and threading.current_thread() is main
                ):
                    self.counts.setdefault(progress.ready, Counter())[__name] += 1
                return __original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._training = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = False  # validation is not a training step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self.dirpath.mkdir(parents=True, exist_ok=True)
        counts = {step: dict(c) for step, c in sorted(self.counts.items())}
        write_text_atomic(self.dirpath / f"rank{trainer.global_rank}.json", json.dumps(counts, indent=1))

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._saved = {}


class RunPlots(L.Callback):
    """PNGs in ``<run>/<dirname>/`` when training ends (rank 0 only), also logged to wandb."""

    def __init__(
        self, dirname: str = "plots", max_samples: int = 2000, per_class: int = 8, projection: str = "pca"
    ):
        self.dirname = dirname
        self.max_samples = max_samples
        self.per_class = per_class
        self.projection = projection

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and hasattr(pl_module, "keep_val_embeddings"):
            pl_module.keep_val_embeddings = self.max_samples  # the last validation's, for the plots

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir) / self.dirname
        for logger in trainer.loggers:
            logger.save()
        csv_file = next(
            (
                Path(lg.log_dir) / "metrics.csv"
                for lg in trainer.loggers
                if isinstance(lg, _LightningCSVLogger)
            ),
            None,
        )
        sharded = any(hasattr(p, "to_local") for p in pl_module.parameters())
        if sharded:  # rank 0 alone cannot run a sharded model (every block gathers from all ranks)
            pl_module.print(
                "plots: embedding plots skipped under trainer=fsdp (curves only); plot the export "
                "with a single-process run instead"
            )
        # The val loader's workers (when the val set must be embedded again) are forked first, while
        # this is the only thread: a fork during another thread's import can deadlock the child.
        source = None if sharded else self._val_source(trainer, pl_module)
        # metrics.csv is complete: its curves are drawn in a thread while this one embeds the val
        # set (torch's kernels release the GIL), so the two overlap; the embedding plots follow.
        with ThreadPoolExecutor(1, thread_name_prefix="plots") as pool:
            curves = None
            if csv_file is not None and csv_file.exists():
                curves = pool.submit(lambda: plots.plot_curves(plots.read_metrics_csv(csv_file), out))
            embedded = None if source is None else self._val_embeddings(pl_module, source)
            written: list[Path] = curves.result() if curves is not None else []
        if embedded is not None:
            written += self._embedding_plots(*embedded, out)
        for logger in trainer.loggers:
            if isinstance(logger, _LightningWandbLogger):
                for path in written:
                    logger.log_image(key=f"plots/{path.stem}", images=[str(path)])
        if written:
            pl_module.print(f"plots: {out}")

    def _val_source(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """What the embedding plots are made from: the last validation's embeddings when it ran on
        the final weights (no second pass over the val set), else an iterator over the val loader
        (its workers started now), or None when there is nothing to plot."""
        model, prompts = pl_module.model, getattr(pl_module, "zeroshot", None)
        datamodule = trainer.datamodule
        if datamodule is None or not prompts or "text" not in model.modalities:
            return None
        kept = getattr(pl_module, "last_val_embeddings", None)
        if kept is not None and kept["step"] == trainer.global_step and kept["features"]:
            return kept
        loader = datamodule.val_dataloader()
        if isinstance(loader, list) and not loader:
            return None
        return iter(loader)

    @torch.no_grad()
    def _val_embeddings(self, pl_module: L.LightningModule, source: Any):
        """``(features {m: [n, D]}, labels {m: [n]}, class prompt embeddings, class names)`` of up to
        ``max_samples`` labelled val rows per non-text modality (from :meth:`_val_source`), or None."""
        model, prompts = pl_module.model, pl_module.zeroshot
        was_training = model.training
        model.eval()
        try:
            if isinstance(source, dict):
                feats, labels = source["features"], source["labels"]
            else:
                found = self._embed_val_set(pl_module, source)
                if found is None:
                    return None
                feats, labels = found
            feats = {m: x for m, x in feats.items() if len(x)}
            if not feats:  # class names, but no val row carries a class label (cls) to plot them with
                pl_module.print("plots: no val row has a class label (cls): similarity/projection skipped")
                return None
            tokenize = model.towers["text"].preprocess(False)
            classes = class_embeddings(
                prompts["classnames"],
                prompts["templates"],
                lambda texts: model.encode_text(
                    torch.stack([tokenize(t) for t in texts]).to(pl_module.device)
                ),
            )
        finally:
            model.train(was_training)
        return feats, labels, classes.float().cpu().numpy(), prompts["classnames"]

    def _embed_val_set(self, pl_module: L.LightningModule, batches: Any):
        model = pl_module.model
        queries = [m for m in model.modalities if m != "text"]
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in queries}
        labels: dict[str, list[torch.Tensor]] = {m: [] for m in queries}
        seen = 0
        for batch in batches:
            if "cls" not in batch:
                return None
            batch = {
                k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            for m in queries:
                if m in batch:
                    feats[m].append(model.encode(m, batch[m]).float().cpu())
                    labels[m].append(batch["cls"].cpu())
            seen += len(batch["cls"])
            if seen >= self.max_samples:
                break
        return (
            {m: torch.cat(v) for m, v in feats.items() if v},
            {m: torch.cat(v) for m, v in labels.items() if v},
        )

    def _embedding_plots(
        self,
        feats: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        class_feats,
        names: list[str],
        out: Path,
    ) -> list[Path]:
        written = []
        for m, x in feats.items():
            x, y = x.numpy(), labels[m].numpy()
            written.append(
                plots.plot_similarity(
                    x, y, class_feats, names, out / f"similarity_{m}_text.png", per_class=self.per_class
                )
            )
            written.append(
                plots.plot_projection(x, y, names, out / f"projection_{m}.png", method=self.projection)
            )
        return written
