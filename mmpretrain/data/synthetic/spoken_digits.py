"""Bundled audio data: spoken digits synthesised with espeak-ng, each paired with a digits image.

Every sample carries ``wav`` (the class word spoken by a plain English espeak-ng voice, ``en`` or
``en-us``, with a random variant, speed and pitch), ``png`` (a scikit-learn digits image of the
same class), ``txt`` (a caption) and ``cls``. The image/audio pairing is by class only: it is
what lets a trimodal run measure audio<->image alignment that no loss term ever saw.

The train/val split of the images is the one of ``mmpretrain data digits`` (same seed), so a run
that trains image-text on the digits and evaluates on these val shards never saw a val image.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf

from mmpretrain.data.synthetic.digits import CLASSNAMES, digit_png, write_prompt_files, write_split

ESPEAK = "espeak-ng"
VOICES = ["en", "en-us"]
# espeak-ng's plain voice variants (male m1-m7, female f1-f4); None = the voice's default.
VARIANTS = [None, "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4"]
SPEEDS = (120, 220)  # words per minute
PITCHES = (20, 80)  # espeak-ng -p, 0..99

CAPTIONS = [
    "someone saying {}",
    "a voice says {}.",
    "the spoken word {}",
    "a recording of the number {}.",
    "{}",
    "the digit {} read aloud",
    "number {}",
    "a person counting: {}",
]
TEMPLATES = [
    "the number {}.",
    "the digit {}.",
    "someone saying {}.",
    "{}",
]


class EspeakMissingError(RuntimeError):
    pass


def espeak_path() -> str:
    path = shutil.which(ESPEAK)
    if path is None:
        raise EspeakMissingError(
            f"`mmpretrain data spoken-digits` needs the {ESPEAK} command, which is not on PATH. Install it: "
            f"`sudo apt-get install espeak-ng` (Debian/Ubuntu), `sudo dnf install espeak-ng` (Fedora), "
            f"`brew install espeak-ng` (macOS), or `conda install -c conda-forge espeak-ng`; then rerun."
        )
    return path


def speak(exe: str, word: str, voice: str, speed: int, pitch: int, sample_rate: int) -> bytes:
    """The word as a 16-bit PCM wav at ``sample_rate`` (espeak-ng writes 22.05 kHz)."""
    proc = subprocess.run(
        [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(
            f"{ESPEAK} -v {voice} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    wave, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if sr != sample_rate:
        from mmpretrain.towers.audio import resample

        wave = resample(wave, sr, sample_rate)
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def voice_params(rng: random.Random) -> tuple[str, int, int]:
    voice = rng.choice(VOICES)
    variant = rng.choice(VARIANTS)
    return (f"{voice}+{variant}" if variant else voice), rng.randint(*SPEEDS), rng.randint(*PITCHES)


def build_spoken_digits(
    out: str | Path,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.2,
    sample_rate: int = 16000,
    clips_per_image: int = 1,
    train_shards: int = 8,
    val_shards: int = 4,
    workers: int = 4,
) -> Path:
    """Write ``out/{train,val}/*.tar`` (wav, png, txt, cls), ``classnames.txt``, ``templates.txt``."""
    from sklearn.datasets import load_digits

    exe = espeak_path()
    out = Path(out)
    digits = load_digits()
    order = np.random.RandomState(seed).permutation(len(digits.target))  # the split of build_digits
    n_val = round(len(order) * val_fraction)
    splits = {"val": order[:n_val], "train": order[n_val:]}
    rng = random.Random(seed + 1)
    plan = {
        name: [(int(i), c, voice_params(rng)) for i in idx for c in range(clips_per_image)]
        for name, idx in splits.items()
    }
    # Identical (word, voice, speed, pitch) requests are synthesised once; a small pool of
    # threads runs the espeak-ng processes in parallel.
    requests = sorted(
        {(CLASSNAMES[int(digits.target[i])], *p) for items in plan.values() for i, _, p in items}
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        audio = dict(zip(requests, pool.map(lambda r: speak(exe, *r, sample_rate), requests)))
    for name, items in plan.items():
        samples = []
        for i, c, params in items:
            label = int(digits.target[i])
            word = CLASSNAMES[label] if rng.random() < 0.5 else str(label)
            samples.append(
                {
                    "__key__": f"spoken_{i:05d}_{c}",
                    "wav": audio[(CLASSNAMES[label], *params)],
                    "png": digit_png(digits.data[i], image_size),
                    "txt": rng.choice(CAPTIONS).format(word),
                    "cls": str(label),
                }
            )
        write_split(out, name, samples, train_shards if name == "train" else val_shards)
    write_prompt_files(out, TEMPLATES)
    return out
