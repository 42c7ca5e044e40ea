"""Fast checks of the fault-tolerance pieces: atomic checkpoints, resume=auto, exact stream resume,
shard policy, and untrusted input (pickles in checkpoints and shards, ``_target_`` allow-list)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from mmpretrain.config import UnsafeTargetError
from mmpretrain.data import ShardStream, Source
from mmpretrain.data.stream.shards import check_shard_counts
from mmpretrain.io import UnsafeCheckpointError, torch_load_safe
from mmpretrain.runs import is_complete_checkpoint, newest_complete_checkpoint
from mmpretrain.training.callbacks import AtomicCheckpointIO
from tests.conftest import digits_datamodule
from tests.unit.test_data import PREPROCESS, good, png_bytes, write_shard


# -- atomic checkpoints and resume=auto ------------------------------------------------------
def test_a_write_that_dies_midway_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full / killed")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert io_.load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path):
    from mmpretrain.runs import resume_path as _resume_path

    ckpts = tmp_path / "checkpoints"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"global_step": 4}, ckpts / "step0000004.ckpt")
    io_.save_checkpoint({"global_step": 6}, ckpts / "last.ckpt")
    # newer, but broken: a file cut short (not written by us) and a temp file of a killed write
    full = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "step0000008.ckpt").write_bytes(full[: len(full) // 2])
    (ckpts / ".last.ckpt.tmp-999").write_bytes(full[:100])
    os.utime(ckpts / "step0000004.ckpt", (1, 1))
    assert not is_complete_checkpoint(ckpts / "step0000008.ckpt")
    assert newest_complete_checkpoint(ckpts) == ckpts / "last.ckpt"
    cfg = OmegaConf.create({"resume": "auto", "ckpt_path": None})
    assert _resume_path(cfg, tmp_path) == str(ckpts / "last.ckpt")
    assert _resume_path(OmegaConf.create({"resume": None, "ckpt_path": "auto"}), tmp_path) == str(
        ckpts / "last.ckpt"
    )
    assert _resume_path(cfg, tmp_path / "fresh") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _resume_path(OmegaConf.create({"resume": str(tmp_path / "nope.ckpt")}), tmp_path)


# -- the train stream: same length on every rank, exact resume from any batch -------------------
def uneven_shards(tmp_path, n=5):
    return [write_shard(tmp_path / f"t-{s}.tar", [good(s * 10 + i) for i in range(7 + s)]) for s in range(n)]


def loader(
    urls, rank, start_batch=0, workers=2, per_worker=3, policy="error", transform=None, positions=None
):
    preprocess = dict(PREPROCESS)
    if transform:
        preprocess["image"] = transform
    stream = ShardStream(
        [Source("s", urls)],
        preprocess,
        batch_size=4,
        train=True,
        batches_per_worker=per_worker,
        rank=rank,
        world_size=2,
        seed=1,
        shuffle_buffer=6,
        start_batch=start_batch,
        shard_policy=policy,
        positions=positions,
    )
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=True)


def epochs(dl, n):
    return [b for _ in range(n) for b in dl]


def positions_after(batches, k, workers=2):
    """What the checkpoint after ``k`` consumed batches holds: each stream's position after its last one."""
    return {j % workers: batches[j]["__position__"] for j in range(k)}


def test_every_rank_gets_the_same_number_of_batches_with_uneven_shards(tmp_path):
    urls = uneven_shards(tmp_path)  # 5 shards of 7..11 samples over 2 ranks x 2 workers
    lengths = [len(epochs(loader(urls, rank), 2)) for rank in (0, 1)]
    assert lengths == [12, 12]


def random_crop_value(img):  # an augmentation that draws from torch and python RNGs
    import random

    return torch.tensor([float(next(iter(img.getdata()))[0]), torch.rand(()).item(), random.random()])


@pytest.mark.parametrize("k", [3, 6])
def test_stream_resumed_at_batch_k_continues_exactly(tmp_path, k):
    urls = uneven_shards(tmp_path)
    full = epochs(loader(urls, 1, transform=random_crop_value), 3)  # 18 batches, 6 per epoch
    # Resumed at k: Lightning finishes the partial epoch (6 - k % 6 batches), then whole epochs.
    dl = loader(urls, 1, start_batch=k, transform=random_crop_value, positions=positions_after(full, k))
    resumed = [b for b in dl] + epochs(dl, 2)
    resumed = resumed[: len(full) - k]
    assert [b["__key__"] for b in resumed] == [b["__key__"] for b in full[k:]]
    for a, b in zip(resumed, full[k:]):
        assert torch.equal(a["image"], b["image"])  # augmentation RNG reproduced per sample


def test_too_few_shards_fail_fast_naming_the_fix_or_resample(tmp_path):
    urls = [write_shard(tmp_path / f"t-{s}.tar", [good(s * 10 + i) for i in range(6)]) for s in range(3)]
    with pytest.raises(ValueError, match=r"3 shards for 2 ranks x 2 workers.*data.shard_policy=resample"):
        check_shard_counts([Source("s", urls)], world_size=2, num_workers=2, shard_policy="error")
    check_shard_counts([Source("s", urls)], world_size=2, num_workers=1, shard_policy="error")
    batches = [epochs(loader(urls, rank, policy="resample"), 1) for rank in (0, 1)]
    assert [len(b) for b in batches] == [6, 6]
    assert {k for b in batches[0] + batches[1] for k in b["__key__"]} <= {f"s{i:03d}" for i in range(30)}
    with pytest.raises(ValueError, match="shard_policy must be"):
        loader(urls, 0, policy="sometimes")


def test_datamodule_refuses_to_resume_with_a_different_layout(digits_root):
    dm = digits_datamodule(digits_root)
    state = dm._layout() | {"batches_consumed": 5, "positions": [[None, None]]}
    dm.load_state_dict(state)
    assert dm._resume_batch(dm._layout()) == 5
    dm.load_state_dict(state | {"world_size": 4})
    with pytest.raises(ValueError, match=r"world_size: checkpoint 4 != now 1.*data.resume=approx"):
        dm._resume_batch(dm._layout())


# -- untrusted input ---------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_are_never_unpickled_beyond_weights(tmp_path):
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        torch_load_safe(path)
    with pytest.raises(UnsafeCheckpointError):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_pickle_and_torch_members_of_a_shard_are_never_decoded(tmp_path):
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    evil = pickle.dumps(Payload())
    samples = [
        {"__key__": "a", "png": png_bytes(1), "txt": "one", "pyd": evil, "pth": evil, "pickle": evil},
        {"__key__": "b", "pyd": evil, "pth": evil},  # nothing we decode: skipped as missing image/text
        {"__key__": "c", "png": png_bytes(2), "txt": "two"},
    ]
    url = write_shard(tmp_path / "evil.tar", samples)
    stream = ShardStream([Source("s", [url])], PREPROCESS, batch_size=2, train=False)
    (batch,) = list(stream)
    assert batch["__key__"] == ["a", "c"] and int(batch["__skipped__"]) == 1
    assert not {"pyd", "pth", "pickle"} & set(batch)
    # validation's lists of further captions and probe negatives (empty here) ride along
    assert set(batch) - {"__key__", "image", "text", "__skipped__"} <= {
        "text_more",
        "text_more_owner",
        "probe_negatives",
        "probe_negatives_owner",
        "probe_negatives_kind",
    }
    assert not marker.exists()


@pytest.mark.parametrize(
    "override",
    [
        "+callbacks.evil._target_=os.system",
        "loss._target_=builtins.exec",
        "+logger.evil._target_=logging.os.system",
        "+callbacks.evil._target_=mmpretrain.cli.os.system",
    ],
)
def test_configs_cannot_instantiate_arbitrary_callables(override, digits_root, tmp_path):
    from mmpretrain.commands.train import train
    from tests.conftest import compose_config

    marker = tmp_path / "pwned"
    arg = "command" if "system" in override else "source"
    key = override.split("._target_")[0].lstrip("+")
    cfg = compose_config(
        "train",
        [
            f"data.root={digits_root}",
            "logger=csv",
            "data.num_workers=0",
            override,
            f"+{key}.{arg}='touch {marker}'",
        ],
        run_dir=tmp_path / "run",
    )
    with pytest.raises(UnsafeTargetError, match="not allowed|not an allowed class"):
        train(cfg)
    assert not marker.exists()
