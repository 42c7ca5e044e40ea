"""The optimizer step of ContrastiveModule: temperature clamped before callbacks see the weights;
NonFiniteGuard skipping on the device with its counters read every ``check_every`` steps."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmpretrain.losses import InfoNCE
from mmpretrain.model import MAX_LOGIT_SCALE
from mmpretrain.training.callbacks import NonFiniteError, NonFiniteGuard
from mmpretrain.training.module import ContrastiveModule
from mmpretrain.training.monitor import CountHostSyncs
from tests.unit.test_gradcache import batch, make_model


def module(lr: float, **optim) -> ContrastiveModule:
    return ContrastiveModule(
        make_model(), InfoNCE(), {"lr": lr, "weight_decay": 0.0, "gradient_clip_val": None} | optim
    )


def fit(mod: ContrastiveModule, steps: int, callbacks: list, tmp_path, **trainer) -> L.Trainer:
    kwargs = {
        "max_steps": steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks,
        "limit_val_batches": 0,
        "default_root_dir": str(tmp_path),
    }
    t = L.Trainer(**(kwargs | trainer))
    t.fit(mod, train_dataloaders=DataLoader([batch(12) for _ in range(steps)], batch_size=None))
    return t


@pytest.mark.parametrize("chunks", [1, 2])
def test_step_checkpoint_holds_a_clamped_temperature(tmp_path, chunks):
    """An lr of 10 moves log s by ~10 in AdamW's first step, far outside [0, ln 100]; the step
    checkpoint (a callback at batch end) must already see it clamped."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    mod = module(10.0, grad_cache_chunks=chunks)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=1, save_top_k=-1)
    fit(mod, 2, [ckpt], tmp_path, enable_checkpointing=True)
    saved = sorted(tmp_path.glob("step*.ckpt"))
    assert len(saved) == 2
    for path in saved:
        log_s = torch.load(path, weights_only=True)["state_dict"]["model.logit_scales.shared"]
        assert 0.0 <= float(log_s) <= MAX_LOGIT_SCALE + 1e-6, (path.name, float(log_s))
    assert float(log_s) in (0.0, pytest.approx(MAX_LOGIT_SCALE))  # the lr did push it out


class NaNImages(L.Callback):
    def __init__(self, steps):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 in self.steps:
            batch["image"] = torch.full_like(batch["image"], math.nan)


class Snapshots(L.Callback):
    """Weights and AdamW moments after every optimizer step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        state = {f"w/{n}": p.detach().clone() for n, p in pl_module.named_parameters()}
        state |= {
            f"m/{n}": opt.state[p]["exp_avg"].clone()
            for n, p in pl_module.named_parameters()
            if p in opt.state
        }
        self.after[trainer.global_step] = state


def test_nonfinite_steps_are_skipped_on_the_device_and_the_streak_is_read_every_k_steps(tmp_path):
    """NaN at steps 2-4, max_consecutive 2, check_every 5: no host read in steps 1-4, the weights
    and moments of the skipped steps stay those after step 1, and the read in step 5 stops the run
    (before its update) with the last good weights saved."""
    mod = module(1e-2)
    guard = NonFiniteGuard(str(tmp_path), max_consecutive=2, check_every=5)
    snaps, counter = Snapshots(), CountHostSyncs(str(tmp_path / "syncs"))
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        fit(mod, 10, [NaNImages([2, 3, 4]), guard, snaps, counter], tmp_path, log_every_n_steps=5)
    assert mod.optimizers().optimizer.defaults["fused"]  # the default fused AdamW: skipped inside its kernel
    assert sorted(snaps.after) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        for k, v in snaps.after[1].items():
            assert torch.equal(snaps.after[step][k], v), (step, k)
    assert {s: c for s, c in counter.counts.items() if s < 5} == {}  # read only at step 5
    assert guard.skipped == 3
    saved = torch.load(tmp_path / "nonfinite-stop.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    for k, v in saved["state_dict"].items():
        if f"w/{k}" in snaps.after[1]:
            assert torch.equal(v, snaps.after[1][f"w/{k}"]), k


def test_a_streak_that_ends_before_the_read_is_counted_but_training_goes_on(tmp_path):
    mod = module(1e-2)
    guard = NonFiniteGuard(str(tmp_path), max_consecutive=3, check_every=4)
    snaps = Snapshots()
    fit(mod, 8, [NaNImages([2, 3]), guard, snaps], tmp_path)
    assert guard.skipped == 2 and guard.consecutive == 0
    assert all(torch.isfinite(v).all() for v in snaps.after[8].values())
    assert not torch.equal(
        snaps.after[8]["w/model.towers.image.net.0.weight"],
        snaps.after[1]["w/model.towers.image.net.0.weight"],
    )
    assert json.dumps(guard.state_dict()) == json.dumps({"skipped": 2, "consecutive": 0})


class CountReads:
    """Count host reads of tensors (and ``nonzero``, whose output shape needs one) while active."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, __name=name, __original=original, **kwargs):
                self.calls.append(__name)
                return __original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_partial_batch_through_a_tower_without_batchnorm_needs_no_host_read(monkeypatch):
    model = make_model()
    model.train()
    x = batch(8)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    with torch.random.fork_rng():
        full = model.encode("image", x["image"])
    reads = CountReads(monkeypatch)
    with torch.random.fork_rng():
        out = model({"image": x["image"], "image_mask": mask, "text": x["text"]})
    assert reads.calls == []
    assert torch.equal(out["image_features"], full * mask[:, None])


def test_partial_batch_through_a_batchnorm_tower_encodes_only_present_rows():
    model = make_model()
    model.towers["image"].net.insert(1, torch.nn.BatchNorm1d(16))
    model.train()
    x = batch(8)["image"]
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    present = model.encode("image", x[mask])
    out = model({"image": x, "image_mask": mask})["image_features"]
    assert torch.allclose(out[mask], present, atol=1e-6) and out[~mask].abs().max() == 0


def test_tiled_loss_never_reads_the_scale_on_the_host(monkeypatch):
    from mmpretrain.losses import tiled_clip_loss

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(10, 4, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    reads = CountReads(monkeypatch)
    loss = tiled_clip_loss(a, b, scale, tile=3)
    loss.backward()
    assert [c for c in reads.calls if c != "nonzero"] == []
    monkeypatch.undo()
    ref = InfoNCE()({"image_features": a, "text_features": b, "logit_scale": scale})["image_text_loss"]
    assert torch.allclose(loss, ref, atol=1e-5)


def test_under_ddp_a_stream_that_can_yield_partial_batches_gets_masks_on_every_batch():
    """collate adds <m>_mask only to batches where some row lacks m; under DDP the masked loss gathers
    one tensor more than the plain one, so the module decides from the data config, not per batch."""
    from types import SimpleNamespace

    from mmpretrain.data.stream.shards import Source
    from mmpretrain.training.module import _may_yield_partial_batches

    def dm(on_missing, *modalities):
        return SimpleNamespace(
            cfg={"on_missing": on_missing},
            sources=[Source(str(i), [], 1.0, list(m)) for i, m in enumerate(modalities)],
        )

    assert not _may_yield_partial_batches(dm("skip", ["image", "text"]))
    assert not _may_yield_partial_batches(dm("skip", []))
    assert _may_yield_partial_batches(dm("partial", ["image", "text"]))
    assert _may_yield_partial_batches(dm("skip", ["image", "text"], ["audio", "text"]))

    mod = module(1e-3)
    b = batch(4) | {"image_mask": torch.tensor([True, False, True, True])}
    assert mod._masks_on_every_rank(b) is b  # single process / complete stream: untouched
    mod._partial_stream = True
    out = mod._masks_on_every_rank(batch(4))
    assert out["image_mask"].all() and out["text_mask"].all() and out["image_mask"].shape == (4,)
    assert torch.equal(mod._masks_on_every_rank(b)["image_mask"], b["image_mask"])


class LoggingDecisions(L.Callback):
    """Per training batch: our module's decision to log and Lightning's own (a private property, read
    here only to hold ours against it)."""

    def __init__(self):
        self.ours, self.lightnings = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning's decision for the batch that just ran, as its logger connector takes it after the step
        self.lightnings.append(trainer._logger_connector.should_update_logs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ours.append(pl_module._logs_written_after_this_step())


@pytest.mark.parametrize("every", [1, 3, 5])
def test_the_module_logs_on_the_steps_lightning_writes_logs(tmp_path, every):
    """``_logs_written_after_this_step`` (public attributes only) decides as Lightning's logger connector
    does at every batch (besides the last one of the run, which the module always logs)."""
    decisions = LoggingDecisions()
    fit(module(1e-3), 11, [decisions], tmp_path, log_every_n_steps=every)
    assert decisions.ours[:-1] == [d for d in decisions.lightnings[:-1]]
    assert sum(decisions.ours[:-1]) == 10 // every
