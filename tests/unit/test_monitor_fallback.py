"""Which metric the best checkpoint (and a sweeper) watches, decided from the composed config."""

import pytest

from mmpretrain.commands.train import _hard_negatives, _resolve_monitor
from tests.conftest import compose_config


def test_without_class_names_the_monitor_is_the_pairs_mean_r1(tmp_path):
    cfg = compose_config("train", [], run_dir=tmp_path)
    _resolve_monitor(cfg, has_classnames=True)
    assert cfg.callbacks.model_checkpoint.monitor == "val/zeroshot_top1/image_text"
    _resolve_monitor(cfg, has_classnames=False)
    assert cfg.optimized_metric == "val/retrieval_mean_R@1/image_text"
    assert cfg.callbacks.model_checkpoint.monitor == "val/retrieval_mean_R@1/image_text"


@pytest.mark.parametrize("override", ["trainer.limit_val_batches=0", "data.val=null"])
def test_without_validation_nothing_is_monitored(tmp_path, override):
    cfg = compose_config("train", [override], run_dir=tmp_path)
    _resolve_monitor(cfg, has_classnames=True)
    assert cfg.callbacks.model_checkpoint.monitor is None


def test_hard_negatives_are_infonce_only(tmp_path):
    assert _hard_negatives(compose_config("train", [], run_dir=tmp_path).loss) == 0
    cfg = compose_config("train", ["loss.hard_negatives=true", "loss.max_negatives=3"], run_dir=tmp_path)
    assert _hard_negatives(cfg.loss) == 3
    cfg = compose_config("train", ["loss=siglip", "+loss.hard_negatives=true"], run_dir=tmp_path)
    with pytest.raises(ValueError, match="needs loss=infonce"):
        _hard_negatives(cfg.loss)


def test_zero_shot_tasks_are_read_from_data_val_tasks(tmp_path):
    from mmpretrain.evaluation.zeroshot import tasks_from_config

    (tmp_path / "tasks" / "color").mkdir(parents=True)
    (tmp_path / "tasks" / "color" / "classnames.txt").write_text("red\ngreen\n")
    (tmp_path / "tasks" / "shape" / "nothing").mkdir(parents=True)  # no classnames.txt: not a task
    (tmp_path / "templates.txt").write_text("a photo of a {} thing\n")
    cfg = compose_config("train", ["data=shards", f"data.root={tmp_path}"], run_dir=tmp_path)
    assert tasks_from_config(cfg.data.val) == {
        "color": {"classnames": ["red", "green"], "templates": ["a photo of a {} thing"]}
    }
    cfg = compose_config(
        "train", ["data=shards", f"data.root={tmp_path}", "data.val.tasks=null"], run_dir=tmp_path
    )
    assert tasks_from_config(cfg.data.val) == {}


def test_several_captions_per_sample_are_infonce_only_and_not_grad_cached(tmp_path):
    from mmpretrain.commands.train import _captions_per_sample

    assert _captions_per_sample(compose_config("train", [], run_dir=tmp_path)) == 1
    assert (
        _captions_per_sample(compose_config("train", ["data.captions_per_sample=5"], run_dir=tmp_path)) == 5
    )
    for overrides, message in (
        (["loss=siglip"], "trains with loss=infonce"),
        (["loss=coca"], "trains with loss=infonce"),
        (["optim.grad_cache_chunks=2"], "grad_cache_chunks"),
    ):
        cfg = compose_config("train", ["data.captions_per_sample=3", *overrides], run_dir=tmp_path)
        with pytest.raises(ValueError, match=message):
            _captions_per_sample(cfg)


def test_class_names_over_val_shards_without_labels_monitor_retrieval(tmp_path, capsys, monkeypatch):
    """A classnames.txt beside captioned shards with no ``cls`` (how users often hold theirs): there is
    nothing for zero-shot to score, so the best checkpoint follows retrieval, said as such."""
    from mmpretrain.commands.train import _val_labelled
    from tests.unit.test_data import good, write_shard

    labelled, unlabelled = tmp_path / "labelled.tar", tmp_path / "unlabelled.tar"
    write_shard(labelled, [good(i) for i in range(3)])
    write_shard(unlabelled, [{k: v for k, v in good(i).items() if k != "cls"} for i in range(3)])
    cfg = compose_config("train", [f"data.val.shards={unlabelled}"], run_dir=tmp_path)
    assert not _val_labelled([str(unlabelled)], cfg.data)
    _resolve_monitor(cfg, has_classnames=True, has_labels=False)
    assert cfg.optimized_metric == "val/retrieval_mean_R@1/image_text"
    assert "the val shards carry no class labels (cls)" in capsys.readouterr().out
    monkeypatch.setenv("LOCAL_RANK", "1")  # the rank Lightning's DDP launcher starts: resolves, quietly
    again = compose_config("train", [f"data.val.shards={unlabelled}"], run_dir=tmp_path)
    _resolve_monitor(again, has_classnames=True, has_labels=False)
    assert again.optimized_metric == cfg.optimized_metric and not capsys.readouterr().out
    assert _val_labelled([str(labelled)], cfg.data)
    keyed = compose_config("train", ["data.modality_keys={cls:[txt]}"], run_dir=tmp_path)  # another key
    assert _val_labelled([str(unlabelled)], keyed.data)
    assert _val_labelled([], cfg.data)  # no val shards: left for the loader to report
