"""The spoken-digits builder: a clear message without espeak-ng; a tiny real build when it exists."""

import io
import shutil
import subprocess
import sys

import pytest
import soundfile as sf
import webdataset as wds

from mmpretrain.data.synthetic.spoken_digits import EspeakMissingError, build_spoken_digits


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(EspeakMissingError, match=r"needs the espeak-ng command.*apt-get install espeak-ng"):
        build_spoken_digits(tmp_path / "sd")
    assert not (tmp_path / "sd").exists()


@pytest.mark.slow
def test_cli_without_espeak_fails_with_the_install_hint(tmp_path):
    import os

    env = {"PATH": "", "PYTHONPATH": os.getcwd(), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmpretrain.cli",
            "data",
            "spoken-digits",
            f"out={tmp_path}/sd",
            f"hydra.run.dir={tmp_path}/h",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "apt-get install espeak-ng" in proc.stderr + proc.stdout


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_tiny_build_writes_paired_shards(tmp_path, monkeypatch):
    import numpy as np
    from sklearn import datasets

    real = datasets.load_digits()
    keep = np.concatenate([np.where(real.target == c)[0][:3] for c in range(10)])  # 30 images

    class Small:
        data, target = real.data[keep], real.target[keep]

    monkeypatch.setattr(datasets, "load_digits", lambda: Small)
    out = build_spoken_digits(tmp_path / "sd", train_shards=2, val_shards=1)
    assert (out / "classnames.txt").read_text().split() == [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
    ]
    samples = list(wds.WebDataset(str(out / "train" / "train-{0000..0001}.tar"), shardshuffle=False))
    samples += list(wds.WebDataset(str(out / "val" / "val-0000.tar"), shardshuffle=False))
    assert len(samples) == 30
    for s in samples:
        assert {"wav", "png", "txt", "cls"} <= set(s)
        wave, sr = sf.read(io.BytesIO(s["wav"]))
        assert sr == 16000 and 0.2 < len(wave) / sr < 2.0 and abs(wave).max() > 0.05
        label = int(s["cls"])
        # The image is a digits image of the sample's class.
        idx = int(s["__key__"].split("_")[1])
        assert Small.target[idx] == label
