"""plots.py on synthetic inputs: curves from a CSVLogger-style file, heatmap, projection."""

import numpy as np
import pytest
from PIL import Image

from mmpretrain.training import plots


def _pixels(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _assert_non_uniform(path):
    px = _pixels(path)
    assert len(np.unique(px.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))) > 10


def test_read_metrics_csv_keeps_each_metric_with_its_own_steps(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,lr-AdamW,step,train/logit_scale/shared,train/loss,val/zeroshot_top1/image_text\n"
        "0,0.001,0,14.0,4.0,\n0,0.002,1,20.0,3.5,\n0,,1,,,0.25\n0,0.003,2,25.0,nan,\n"
    )
    series = plots.read_metrics_csv(csv)
    assert series["train/loss"][0].tolist() == [0, 1] and series["train/loss"][1].tolist() == [4.0, 3.5]
    assert series["val/zeroshot_top1/image_text"][0].tolist() == [1] and series[
        "val/zeroshot_top1/image_text"
    ][1].tolist() == [0.25]
    assert "epoch" not in series and "step" not in series
    temps = plots.with_temperature(series)["train/temperature/shared"][1]
    assert temps.tolist() == pytest.approx([1 / 14, 1 / 20, 1 / 25])

    written = plots.plot_curves(series, tmp_path / "plots")
    assert sorted(p.stem for p in written) == ["learning_rate", "loss", "temperature", "zeroshot"]
    for path in written:
        _assert_non_uniform(path)


def test_similarity_heatmap_and_projection(tmp_path):
    rng = np.random.default_rng(0)
    classes = rng.normal(size=(4, 16))
    labels = np.repeat(np.arange(4), 30)
    features = classes[labels] + 0.3 * rng.normal(size=(120, 16))
    names = ["zero", "one", "two", "three"]
    _assert_non_uniform(
        plots.plot_similarity(features, labels, classes, names, tmp_path / "sim.png", per_class=5)
    )
    for method in ("pca", "tsne"):
        _assert_non_uniform(
            plots.plot_projection(features, labels, names, tmp_path / f"{method}.png", method=method)
        )
    # the projection keeps well-separated classes apart: each class mean is nearer its own points
    xy = plots.project_2d(features, "pca")
    centres = np.stack([xy[labels == c].mean(0) for c in range(4)])
    nearest = np.linalg.norm(xy[:, None] - centres[None], axis=-1).argmin(1)
    assert (nearest == labels).mean() > 0.9
    with pytest.raises(ValueError, match="use pca or tsne"):
        plots.project_2d(features, "umap")


def test_pca_projection_is_the_top_two_principal_axes_with_fixed_signs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 12)) * np.linspace(3, 0.1, 12)  # distinct variances: unique axes
    xy = plots.project_2d(x, "pca")
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    z = z - z.mean(0)
    _, vecs = np.linalg.eigh(np.cov(z, rowvar=False))
    reference = z @ vecs[:, ::-1][:, :2]  # the covariance's top two eigenvectors
    for k in range(2):
        assert np.allclose(np.abs(xy[:, k]), np.abs(reference[:, k]), atol=1e-8)
    assert np.array_equal(xy, plots.project_2d(x.copy(), "pca"))  # same picture every run
    assert plots.project_2d(x[:1], "pca").shape == (1, 2)  # one sample: a point, not an error


class _Towers(dict):
    pass


class _FakeModel:
    """encode: a fixed function of the input, so a val pass gives known features."""

    modalities = ["image", "text"]

    def __init__(self):
        import torch

        self.training = True
        self.towers = {
            "text": type(
                "T", (), {"preprocess": staticmethod(lambda train: lambda s: torch.tensor([len(s)]))}
            )()
        }

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def encode(self, m, x):
        return x.float().reshape(len(x), -1)[:, :4]

    def encode_text(self, tokens):
        return tokens.float().repeat(1, 4)


def _plots_module(kept):
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(
        model=_FakeModel(),
        zeroshot={"classnames": ["a", "b"], "templates": ["{}"]},
        last_val_embeddings=kept,
        device=torch.device("cpu"),
    )


def test_end_of_run_plots_reuse_the_last_validation_only_when_it_saw_the_final_weights():
    """RunPlots embeds the val set again only when the last validation ran before the final step."""
    from types import SimpleNamespace

    import torch

    from mmpretrain.training.monitor import RunPlots

    batches = [{"image": torch.arange(16.0).view(2, 8), "cls": torch.tensor([0, 1])}]
    passes = []

    class Data:
        def val_dataloader(self):
            passes.append(1)
            return batches

    kept = {"step": 10, "features": {"image": torch.ones(3, 4)}, "labels": {"image": torch.tensor([1, 0, 1])}}
    trainer = SimpleNamespace(global_step=10, datamodule=Data())
    plots_cb, module = RunPlots(), _plots_module(kept)
    feats, labels, classes, names = plots_cb._val_embeddings(module, plots_cb._val_source(trainer, module))
    assert (
        not passes and torch.equal(feats["image"], torch.ones(3, 4)) and labels["image"].tolist() == [1, 0, 1]
    )
    assert classes.shape == (2, 4) and names == ["a", "b"]

    trainer.global_step = 11  # trained on after that validation: its embeddings are stale
    module = _plots_module(kept)
    source = plots_cb._val_source(trainer, module)
    assert passes == [1]  # the val loader is opened (its workers forked) before any plotting thread starts
    feats, labels, _, _ = plots_cb._val_embeddings(module, source)
    assert (
        passes == [1]
        and torch.equal(feats["image"], batches[0]["image"][:, :4])
        and labels["image"].tolist() == [0, 1]
    )
    assert module.model.training  # put back in training mode


def _recall_series(repeat: float | None):
    steps = np.array([10.0, 20.0])
    series = {
        "val/retrieval_R@1/image_to_text": (steps, np.array([0.0, 0.01])),
        "val/retrieval_class_R@1/image_to_text": (steps, np.array([0.3, 0.9])),
    }
    if repeat is not None:
        series["val/caption_repeat_frac"] = (steps, np.array([repeat, repeat]))
    return series


@pytest.mark.parametrize(
    ("repeat", "shown"),
    [(1.0, "val/retrieval_class_R@1/image_to_text"), (0.02, "val/retrieval_R@1/image_to_text"), (None, None)],
)
def test_retrieval_plot_shows_class_recall_only_where_most_captions_repeat(tmp_path, repeat, shown):
    shown = shown or "val/retrieval_R@1/image_to_text"  # no repeat measurement (older runs): instance recall
    title, wanted = plots.retrieval_curves(_recall_series(repeat))
    assert [k for k in _recall_series(repeat) if wanted(k)] == [shown]
    assert title.startswith("class recall") == (shown.startswith("val/retrieval_class"))
    (path,) = [p for p in plots.plot_curves(_recall_series(repeat), tmp_path) if p.stem == "retrieval"]
    with Image.open(path) as im:
        assert im.text["Title"] == title  # the PNG says what it plots
    if repeat == 1.0:
        assert "100% of val captions repeat" in title
