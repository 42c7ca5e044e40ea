"""The moving-digits builder: reproducible mp4 shards, captions that name the digit, direction and
speed (read back by a reader of their own), frames that really move that way at that speed
(measured on the decoded mp4), a direction no single frame reveals, a spoken caption muxed as the
mp4's audio track, and the console command."""

import io
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from scipy.stats import ks_2samp

from mmpretrain.data.synthetic.digits import CLASSNAMES
from mmpretrain.data.synthetic.moving_digits import build_moving_digits, plan_clip
from mmpretrain.data.synthetic.moving_digits.captions import DIRECTION_WORDS, SPEED_ADJECTIVES, SPEED_ADVERBS
from mmpretrain.data.synthetic.moving_digits.motion import DIRECTIONS, SPEEDS, corner, render

TINY = {"train": 24, "val": 12, "shard_size": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_moving_digits(tmp_path_factory.mktemp("md") / "m", workers=2, **TINY)


def samples(root: Path, split: str) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in (root / split).glob("*.tar")), shardshuffle=False))


def all_samples(root: Path) -> list[dict]:
    return samples(root, "train") + samples(root, "val")


def decode_frames(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(format="gray") for f in c.decode(video=0)]).astype(np.float64)


# -- an independent reader of the captions -----------------------------------------------------
def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


DIGIT = {w: i for i, w in enumerate(CLASSNAMES)} | {str(i): i for i in range(10)}
DIR = {w: k for k, ws in DIRECTION_WORDS.items() for w in ws}
SPEED = {w: k for table in (SPEED_ADVERBS, SPEED_ADJECTIVES) for k, ws in table.items() for w in ws}


def read_caption(text: str) -> tuple[list[int], list[str], list[str]]:
    """The digits, directions and speeds the words name, in order."""
    digits = [DIGIT[m] for m in re.findall(rf"\b({_alt(DIGIT)})\b", text)]
    dirs = [DIR[m] for m in re.findall(rf"\b({_alt(DIR)})\b", text)]
    speeds = [SPEED[m] for m in re.findall(rf"(?<![\w-])({_alt(SPEED)})(?![\w-])", text)]
    return digits, dirs, speeds


def shift_per_frame(frames: np.ndarray) -> np.ndarray:
    """(dx, dy) in px a frame: the mean change of the circular centroid of the brightness (a
    translation by s of a digit that stays on the canvas turns the phase of its first Fourier
    coefficient by 2*pi*s/side)."""
    _, h, w = frames.shape
    out = []
    for axis, side in ((2, w), (1, h)):
        profile = frames.sum(axis=3 - axis)  # [T, side]
        phase = np.angle(profile @ np.exp(2j * np.pi * np.arange(side) / side))
        step = np.angle(np.exp(1j * np.diff(phase)))  # wrapped to (-pi, pi]
        out.append(step.mean() * side / (2 * np.pi))
    return np.array(out)


# -- tests -------------------------------------------------------------------------------------
def test_byte_identical_for_a_seed_whatever_the_workers_and_seeds_differ(root, tmp_path):
    one = build_moving_digits(tmp_path / "one", workers=1, **TINY)
    other_seed = build_moving_digits(tmp_path / "seed1", workers=2, seed=1, **TINY)
    for split, n in (("train", 3), ("val", 2)):
        names = sorted(p.name for p in (root / split).glob("*.tar"))
        assert names == [f"{split}-{k:04d}.tar" for k in range(n)]
        for name in names:
            assert (root / split / name).read_bytes() == (one / split / name).read_bytes()
            assert (root / split / name).read_bytes() != (other_seed / split / name).read_bytes()
    assert json.loads((root / "val" / "sizes.json").read_text()) == {"val-0000.tar": 8, "val-0001.tar": 4}
    for task, n in (("digit", 10), ("direction", 4), ("speed", 2)):
        assert len((root / "tasks" / task / "classnames.txt").read_text().split("\n")) == n + 1
    assert (root / "classnames.txt").read_text() == (root / "tasks" / "digit" / "classnames.txt").read_text()


def test_a_rerun_keeps_finished_shards_and_refuses_other_options(root):
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*.tar")}
    build_moving_digits(root, workers=1, **TINY)
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/*.tar")} == before
    with pytest.raises(ValueError, match="choose another out="):
        build_moving_digits(root, workers=1, **(TINY | {"train": 30}))


def test_captions_name_the_digit_direction_and_speed(root):
    seen = set()
    for s in all_samples(root):
        meta = json.loads(s["json"])
        labels, tracks = meta["labels"], meta["digits"]
        assert s["txt"].decode() == meta["captions"][0] and len(set(meta["captions"])) == 5
        assert int(s["cls"]) == labels["digit"] == tracks[0]["label"]
        direction, speed = list(DIRECTIONS)[labels["direction"]], list(SPEEDS)[labels["speed"]]
        for text in meta["captions"]:
            digits, dirs, speeds = read_caption(text)
            assert digits == [t["label"] for t in tracks], text
            assert dirs == [direction] and speeds == [speed], text
        seen.add((direction, speed, len(tracks)))
    assert {d for d, _, _ in seen} == set(DIRECTIONS) and {s for _, s, _ in seen} == set(SPEEDS)
    assert {n for _, _, n in seen} == {1, 2}


def test_decoded_frames_move_in_the_stated_direction_at_the_stated_speed(root):
    measured = 0
    for s in all_samples(root):
        meta = json.loads(s["json"])
        frames = decode_frames(s["mp4"])
        assert frames.shape == (16, 64, 64)
        if len(meta["digits"]) > 1:  # a still digit bends the centroid: checked against the json below
            continue
        dx, dy = DIRECTIONS[list(DIRECTIONS)[meta["labels"]["direction"]]]
        speed = SPEEDS[list(SPEEDS)[meta["labels"]["speed"]]] * 64  # px a frame
        assert np.allclose(shift_per_frame(frames), (dx * speed, dy * speed), atol=0.25), meta
        measured += 1
    assert measured >= 10


def test_each_digit_is_where_the_json_says_in_the_decoded_frames(root):
    side = 24  # 3/8 of 64
    for s in samples(root, "val"):
        meta = json.loads(s["json"])
        frames = decode_frames(s["mp4"])
        for t in (0, 15):
            for d in meta["digits"]:
                x0 = int(np.floor((d["x"] + d["vx"] * t) * 64)) % 64
                y0 = int(np.floor((d["y"] + d["vy"] * t) * 64)) % 64
                box = np.roll(frames[t], (-y0, -x0), axis=(0, 1))
                assert box[:side, :side].sum() > 0.8 * box.sum() / len(meta["digits"]), (t, d)


def test_audio_track_is_the_spoken_caption(root):
    for s in samples(root, "val"):
        speech, rate = sf.read(io.BytesIO(s["flac"]), dtype="float32")
        assert rate == 16000 and 0.5 < len(speech) / rate < 10 and np.abs(speech).max() > 0.05
        with av.open(io.BytesIO(s["mp4"])) as c:
            assert [st.type for st in c.streams] == ["video", "audio"]
            assert (
                c.streams.video[0].codec_context.name == "h264"
                and c.streams.audio[0].codec_context.name == "aac"
            )
            decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
            assert c.streams.audio[0].sample_rate == rate
        # AAC adds up to a frame of priming and pads the end to whole 1024-sample frames.
        assert len(speech) <= len(decoded) < len(speech) + 3 * 1024
        decoded = np.pad(decoded, (0, len(speech) + 2048 - len(decoded)))
        lags = np.correlate(decoded, speech, "valid")
        lag = int(np.argmax(lags))
        aligned = decoded[lag : lag + len(speech)]
        assert np.corrcoef(aligned, speech)[0, 1] > 0.9, lag
        assert 0.8 < np.sqrt(np.mean(aligned**2) / np.mean(speech**2)) < 1.25


def test_no_single_frame_nor_the_unordered_frames_tell_the_direction():
    """A frame at a random time has the same position law for all four directions, and classifiers on
    one such frame or on the mean of all frames (what order-blind pooling sees) are at chance, while
    the same classifier on two frames in order is not. The digit stays whole on the canvas."""
    from sklearn.linear_model import LogisticRegression

    n, frames, size = 800, 16, 32
    side = round(size * 3 / 8)
    plans = [plan_clip(0, "train", i) for i in range(n)]
    y = np.array([list(DIRECTIONS).index(p.direction) for p in plans])
    rng = np.random.default_rng(0)
    when = rng.integers(0, frames, n)
    xy = np.array([corner(p.tracks[0], t, size) for p, t in zip(plans, when)])
    assert xy.min() >= 0 and xy.max() <= size - side
    for a in range(4):
        for b in range(a + 1, 4):
            for k in (0, 1):
                assert ks_2samp(xy[y == a, k], xy[y == b, k]).pvalue > 1e-3, (a, b, k)
    for p in plans[:50]:  # whole in every frame: never wrapped
        clip = render(p.tracks[:1], frames, size)[..., 0].astype(np.float64)
        assert np.allclose(clip.sum((1, 2)), clip[0].sum(), rtol=1e-6)

    def features(clip: np.ndarray, t0: int | None, t1: int | None) -> np.ndarray:
        """Column and row profiles of frame t0 (None: the mean over frames); with t1, the circular
        cross-correlation of the two frames' profiles (where the mass went)."""
        frame = clip.mean(0) if t0 is None else clip[t0]
        profiles = [frame.sum(0), frame.sum(1)]
        if t1 is not None:
            later = [clip[t1].sum(0), clip[t1].sum(1)]
            profiles = [
                np.real(np.fft.ifft(np.conj(np.fft.fft(a)) * np.fft.fft(b))) for a, b in zip(profiles, later)
            ]
        return np.concatenate(profiles)

    clips = [render(p.tracks, frames, size)[..., 0].astype(np.float64) / 255.0 for p in plans]
    half = n * 3 // 4
    chance_max = 0.25 + 4 * np.sqrt(0.25 * 0.75 / (n - half))  # 4 sigma above chance
    for name, rows, readable in (
        ("a frame at a random time", [features(c, int(t), None) for c, t in zip(clips, when)], False),
        ("the mean of the frames", [features(c, None, None) for c in clips], False),
        ("frames 0 and 3 in order", [features(c, 0, 3) for c in clips], True),
    ):
        x = np.array(rows)
        x = (x - x.mean(0)) / (x.std(0) + 1e-9)
        acc = LogisticRegression(max_iter=2000).fit(x[:half], y[:half]).score(x[half:], y[half:])
        assert (acc > 0.9) if readable else (acc < chance_max), (name, acc)


def test_shards_from_the_wrapping_canvas_are_not_taken_as_built(root, tmp_path):
    """A root built before the canvas was bounded (its record has no "canvas") is not used as is:
    building into it again refuses, naming the fix."""
    import shutil

    from mmpretrain.data.builders import is_built

    assert is_built(root, "moving-digits")
    old = tmp_path / "old"
    shutil.copytree(root, old)
    record = json.loads((old / "moving_digits.json").read_text())
    del record["canvas"]
    (old / "moving_digits.json").write_text(json.dumps(record))
    assert not is_built(old, "moving-digits")
    with pytest.raises(ValueError, match="choose another out="):
        build_moving_digits(old, workers=1, **TINY)


def test_bad_options_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="at least 2 frames"):
        build_moving_digits(tmp_path / "a", frames=1)
    with pytest.raises(ValueError, match="at most 21"):
        build_moving_digits(tmp_path / "c", frames=22)
    with pytest.raises(ValueError, match="even side"):
        build_moving_digits(tmp_path / "b", image_size=33)


def test_the_console_command_builds_with_its_options(tmp_path):
    from tests.integration.test_launch import run_cli

    out = tmp_path / "md"
    run_cli(
        [
            "data",
            "moving-digits",
            f"out={out}",
            "train=3",
            "val=2",
            "workers=1",
            "frames=8",
            "image_size=32",
            "fps=4",
            f"hydra.run.dir={tmp_path}/h",
        ],
        cwd=tmp_path / "elsewhere",
        timeout=180,
    )
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"train-0000.tar": 3}
    sample = samples(out, "val")[0]
    assert decode_frames(sample["mp4"]).shape == (8, 32, 32)
    with av.open(io.BytesIO(sample["mp4"])) as c:
        assert c.streams.video[0].average_rate == 4
