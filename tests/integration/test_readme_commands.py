"""The README is executable: every `mmpretrain ...` command it shows runs through the installed console
script, on tiny data with a small budget, from a scratch directory, and exits 0.

``COMMANDS`` holds one entry per command of README.md, spelled exactly as the README spells it: a
``Run`` (how its placeholders become real paths, what budget is appended, which earlier commands
made the files it reads) or a ``Skip`` with the reason. A command added to the README without an
entry here, or an entry whose command left the README, fails the fast consistency test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MODEL_JSON = ROOT / "conf" / "model" / "open_clip" / "vit-4x192-p8-64.json"
CONSOLE_SCRIPT = Path(sys.executable).parent / "mmpretrain"
TIMEOUT_S = 300  # one command; a debug=fast train takes 10-20 s on 2 cores

# -- collecting the README's commands ------------------------------------------------------------
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`\n]+)`")
LAUNCHERS = ("srun ", "torchrun ")


def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _is_command(text: str) -> bool:
    return text.startswith("mmpretrain ") or (text.startswith(LAUNCHERS) and "mmpretrain" in text)


def readme_commands(text: str) -> list[str]:
    """Every command of a README, first occurrence first: the lines of ```bash blocks (``\\``
    continuations joined, comments stripped) and the backticked spans of prose and tables (``\\|``
    unescaped) that start with ``mmpretrain `` or launch it under ``srun`` / ``torchrun``."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in re.sub(r"\s*\\\n\s*", " ", body).splitlines():
            line = _strip_comment(line.strip())
            if _is_command(line):
                found.append(line)
    for span in SPAN.findall(FENCE.sub("", text)):
        span = span.replace(r"\|", "|").strip()
        if _is_command(span):
            found.append(span)
    return list(dict.fromkeys(found))


# -- what each command becomes here --------------------------------------------------------------
# Budgets, appended after the command; an item whose key the command (or its `extra`) already sets
# is left out, so the README's own values win.
TRAIN = ("debug=fast", "callbacks.plots=null", "hydra.run.dir={run}")  # plots: covered by test_sweeps.py
SWEEP = ("debug=fast", "callbacks.plots=null", "hydra.sweep.dir={run}")
EVAL = ("trainer.limit_val_batches=2", "data.batch_size=16", "data.num_workers=0", "hydra.run.dir={run}")
FINETUNE = (
    "task.epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "data.num_workers=0",
    "hydra.run.dir={run}",
)
HYDRA_RUN = ("hydra.run.dir={run}",)
DDP_ON_CPU = "trainer.devices=2 trainer.accelerator=cpu"  # GPUs -> 2 CPU processes (gloo)

DIGITS = "data/digits"  # the default data.root of the digits configs, relative to the scratch directory
SPOKEN = "data/spoken_digits"
MOVING = "data/moving-digits-small"  # 40 train / 20 val clips
SMALL = "data/digits-small"
# a few hundred scenes: the README's command at 50,000 takes minutes  # a quarter of the digits: a linear
# probe embeds every sample of its data
SCENES = "data/scenes-small"
LINEAR_PROBE = (f"data.root={SMALL}", *FINETUNE)

#: data.val.captioning shrunk: a few captions, short, a small retrieval pool
CAPTIONING = (
    "data.val.captioning.samples=4",
    "data.val.captioning.compositional_samples=4",
    "data.val.captioning.retrieval_pool=16",
    "data.val.captioning.max_len=8",
)

#: VQA's rank mode scores (question, answer) sequences with the 49,408-word decoder: few answers each
RANK = ("task.rank_k=2", "task.test=null", "task.decoder.width=64", "task.decoder.layers=1")

MAKE_DIGITS = "mmpretrain data digits out=DIR"
MAKE_RUNS_MINE = "mmpretrain train data.root=/data/my_shards hydra.run.dir=runs/mine"
TEACHER = "mmpretrain train hydra.run.dir=runs/teacher"
EMA_RUN = "mmpretrain train model.ema.enabled=true model.ema.eval_both=true hydra.run.dir=runs/ema"
TEACHER_EMBEDDINGS = (
    "mmpretrain data teacher-embeddings teacher=runs/teacher/export in='data/digits/train/*.tar' "
    "out=data/digits-teacher model=tiny data=digits augmentations=2"
)


@dataclass(frozen=True)
class Run:
    """Run the README command with ``subs`` replaced (in order), ``extra`` and ``budget`` appended."""

    subs: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()
    budget: tuple[str, ...] = TRAIN
    needs: tuple[str, ...] = ()  # README commands whose outputs this one reads; run first if not yet run
    prepare: tuple[Callable[[Path], None], ...] = ()  # write files the command names, before it runs
    requires: tuple[str, ...] = ()  # programs that must be on PATH
    expect: tuple[str, ...] = ()  # text its output must contain
    xfail: str | None = None  # a known library bug: strict, so the entry flips when it is fixed


HUB = "needs the Hugging Face hub (network): real weights; the same paths run offline in test_hub_weights.py"


@dataclass(frozen=True)
class Skip:
    reason: str


def _small_digits(workdir: Path) -> None:
    """SMALL: 2 of the 8 train shards and 1 of the 4 val shards of the digits (with their sizes.json)."""
    if (workdir / SMALL).exists():
        return
    for split, n in (("train", 2), ("val", 1)):
        (workdir / SMALL / split).mkdir(parents=True)
        src = workdir / DIGITS / split
        for path in [*sorted(src.glob("*.tar"))[:n], src / "sizes.json"]:
            shutil.copy(path, workdir / SMALL / split)
    for name in ("classnames.txt", "templates.txt"):
        shutil.copy(workdir / DIGITS / name, workdir / SMALL / name)


def _write_timm_weights(workdir: Path) -> None:
    """A local timm weights file for the LiT recipe (the digits model's image tower is a resnet10t)."""
    import timm
    from safetensors.torch import save_file

    path = workdir / "weights" / "resnet10t.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(path))


def _write_open_clip_trainer_checkpoint(workdir: Path) -> None:
    """``logs/x/checkpoints/epoch_32.pt`` as open_clip's trainer saves it (``module.`` prefixes
    under DDP), from the weights of the open_clip model trained by the README into runs/openclip."""
    import torch
    from safetensors.torch import load_file

    out = workdir / "exported" / "oc"
    _mmpretrain(
        workdir,
        [
            "export",
            "ckpt=runs/openclip/checkpoints/last.ckpt",
            f"out={out}",
            "format=open_clip",
            "hydra.run.dir=runs/readme/export-oc",
        ],
    )
    state = load_file(str(out / "open_clip_model.safetensors"))
    path = workdir / "logs" / "x" / "checkpoints" / "epoch_32.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 32, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


def _write_own_data(workdir: Path) -> None:
    """Tiny stand-ins for the README's own data: own/pairs.csv, own/pairs.tsv, own/photos/<class>/,
    own/i2d."""
    from tests.unit.test_convert import image_table, write_img2dataset

    own = workdir / "own"
    if own.exists():
        return
    own.mkdir()
    image_table(own, n=24)
    (own / "data.csv").rename(own / "pairs.csv")
    tsv, _ = image_table(own, n=24, sep="\t", name="pairs.tsv")
    tsv.write_text(tsv.read_text().replace("filepath\ttitle", "path\tcaption", 1))
    for i in range(24):
        folder = own / "photos" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(own / "img" / f"{i}.png", folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo number {i}")
    write_img2dataset(own / "i2d", shards=3, per_shard=24)


OWN = {"/data/my_shards": "own/shards", "/data/": "own/"}  # in order: the output, then the inputs
SCENES_CLIP = "mmpretrain train experiment=scenes_clip hydra.run.dir=runs/scenes_clip"


def _write_vqa_table(workdir: Path) -> None:
    """own/vqa.csv: two questions on each of 24 images, the colour one with ten annotators' answers."""
    from PIL import Image

    (workdir / "own" / "vqa").mkdir(parents=True, exist_ok=True)
    lines = ["filepath,question,answer"]
    for i in range(24):
        colour = ("red", "blue")[i % 2]
        Image.new("RGB", (32, 32), colour).save(workdir / "own" / "vqa" / f"{i}.jpg")
        lines.append(f"vqa/{i}.jpg,what colour is it?,{'|'.join([colour] * 9 + ['green'])}")
        lines.append(f"vqa/{i}.jpg,is it red?,{'yes' if i % 2 == 0 else 'no'}")
    (workdir / "own" / "vqa.csv").write_text("\n".join(lines) + "\n")


USAGE = "usage synopsis (placeholders, [optional] parts, a|b alternatives); its concrete forms are run: "
SEVERAL_NODES = (
    "several nodes (torchrun rendezvous over 2 machines x 8 GPUs); two torchrun 'nodes' on CPU are "
    "run by tests/integration/test_fault_tolerance.py"
)
SLURM = "needs a SLURM cluster (srun / sbatch through submitit) and CUDA GPUs; neither is here"

# In the order they run: a command comes after the ones whose files it reads.
STORE = "needs an S3 store: tests/integration/test_object_storage.py runs it against moto's server"
COMMANDS: dict[str, Run | Skip] = {
    # -- usage lines
    "mmpretrain <command> [hydra overrides]": Skip(USAGE + "every command below"),
    "mmpretrain train [experiment=NAME] [overrides]": Skip(
        USAGE + "`mmpretrain train`, `train experiment=...`"
    ),
    "mmpretrain eval ckpt=PATH [data.root=DIR]": Skip(
        USAGE + "`mmpretrain eval ckpt=runs/... data.root=...`"
    ),
    "mmpretrain finetune task=linear_probe|full|fusion pretrained=PATH [data.root=DIR]": Skip(
        USAGE + "`mmpretrain finetune task=linear_probe|full|fusion pretrained=runs/demo/...`"
    ),
    "mmpretrain sweep-summary DIR [--metric M] [--minimize] [--json]": Skip(
        USAGE + "`mmpretrain sweep-summary runs/train/multirun/<date>_<time>`"
    ),
    "mmpretrain sweep-summary DIR [--metric KEY] [--minimize] [--json]": Skip(
        USAGE + "`mmpretrain sweep-summary runs/train/multirun/<date>_<time>`"
    ),
    "mmpretrain train -m KEY=a,b,c OTHER=x,y": Skip(USAGE + "`mmpretrain train -m optim.lr=... loss=...`"),
    "mmpretrain <command> --help": Run(subs={"<command>": "train"}, budget=(), expect=("experiment",)),
    # -- data
    "mmpretrain data digits out=DIR": Run(subs={"out=DIR": f"out={DIGITS}"}, budget=HYDRA_RUN),
    "mmpretrain data": Run(budget=HYDRA_RUN),  # writes the default root, data/digits
    "mmpretrain data scenes out=DIR": Run(
        subs={"out=DIR": f"out={SCENES} train=300 val=100 test=100"}, budget=HYDRA_RUN
    ),
    "mmpretrain data scenes out=DIR image_size_min=256 image_size_max=512 shard_size=250": Run(
        subs={"out=DIR": "out=scenes224 train=16 val=8 test=8"}, budget=HYDRA_RUN
    ),
    "mmpretrain data spoken-digits out=DIR": Run(
        subs={"out=DIR": f"out={SPOKEN}"}, budget=HYDRA_RUN, requires=("espeak-ng",)
    ),
    "mmpretrain data moving-digits out=DIR": Run(
        subs={"out=DIR": f"out={MOVING} train=40 val=20"}, budget=HYDRA_RUN, requires=("espeak-ng",)
    ),
    "mmpretrain data shards in=TABLE_OR_FOLDER out=DIR": Skip(
        USAGE + "`mmpretrain data shards in=/data/pairs.csv ...`"
    ),
    "mmpretrain data shards in=/data/pairs.csv out=/data/my_shards": Run(
        subs=OWN, budget=HYDRA_RUN, prepare=(_write_own_data,), expect=("converted into own/shards",)
    ),
    "mmpretrain data shards in=/data/pairs.tsv out=/data/my_shards img_key=path caption_key=caption "
    "label_key=label": Run(subs=OWN, budget=HYDRA_RUN, prepare=(_write_own_data,)),
    "mmpretrain data shards in=/data/photos out=/data/my_shards labels=folders": Run(
        subs=OWN, budget=HYDRA_RUN, prepare=(_write_own_data,)
    ),
    "mmpretrain data shards in=/data/i2d out=DIR": Run(
        subs={"/data/": "own/", "out=DIR": "out=own/i2d_split"}, budget=HYDRA_RUN, prepare=(_write_own_data,)
    ),
    "mmpretrain train data=shards data.root=/data/i2d "
    "'data.sources.main.shards=\"/data/i2d/{00000..00008}.tar\"' "
    "data.val.shards=/data/i2d/00009.tar optimized_metric=val/retrieval_R@1/image_to_text": Run(
        subs={"/data/": "own/", "00008": "00001", "00009": "00002"}, prepare=(_write_own_data,)
    ),
    # -- train, then evaluate / export / fine-tune what it wrote
    "mmpretrain train": Run(expect=("run directory:",)),
    "mmpretrain train trainer.max_epochs=10 optim.lr=1e-3 data.batch_size=64": Run(),
    "mmpretrain train data.root=/data/my_shards hydra.run.dir=runs/mine": Run(
        subs={"/data/my_shards": DIGITS}
    ),
    "mmpretrain eval ckpt=runs/mine/checkpoints/last.ckpt data.root=/data/my_shards": Run(
        subs={"/data/my_shards": DIGITS},
        budget=EVAL,
        needs=(MAKE_RUNS_MINE,),
        expect=("image_text zero-shot top-1: 0.",),
    ),
    "mmpretrain export ckpt=runs/mine/checkpoints/last.ckpt out=exported/mine": Run(
        budget=HYDRA_RUN, needs=(MAKE_RUNS_MINE,)
    ),
    "mmpretrain export ckpt=PATH out=DIR": Run(
        subs={"ckpt=PATH": "ckpt=runs/mine/checkpoints/last.ckpt", "out=DIR": "out=exported/table"},
        budget=HYDRA_RUN,
        needs=(MAKE_RUNS_MINE,),
    ),
    "mmpretrain finetune task=linear_probe pretrained=runs/mine/export data.root=/data/labelled_shards": Run(
        subs={"/data/labelled_shards": SMALL},
        budget=LINEAR_PROBE,
        needs=(MAKE_DIGITS, MAKE_RUNS_MINE),
        prepare=(_small_digits,),
    ),
    # runs/demo is what `make demo` writes; runs/mine has the same layout
    "mmpretrain finetune task=linear_probe pretrained=runs/demo/checkpoints/last.ckpt": Run(
        subs={"runs/demo": "runs/mine"},
        budget=LINEAR_PROBE,
        needs=(MAKE_DIGITS, MAKE_RUNS_MINE),
        prepare=(_small_digits,),
    ),
    "mmpretrain finetune task=full pretrained=runs/demo/export task.layer_decay=0.75": Run(
        subs={"runs/demo": "runs/mine"},
        budget=FINETUNE,
        needs=(MAKE_RUNS_MINE,),
    ),
    "mmpretrain finetune task=fusion fusion=attention pretrained=runs/demo/export": Run(
        subs={"runs/demo": "runs/mine"},
        budget=FINETUNE,
        needs=(MAKE_RUNS_MINE,),
    ),
    "mmpretrain train data=shards data.root=/data/my_shards": Run(
        subs={"/data/my_shards": DIGITS}, needs=(MAKE_DIGITS,)
    ),
    # -- weight EMA, distillation, patch dropout (README "Weight EMA, distillation, patch dropout")
    TEACHER: Run(),
    EMA_RUN: Run(),
    "mmpretrain export ckpt=runs/ema/checkpoints/last.ckpt out=exported/ema-raw export.weights=raw": Run(
        budget=HYDRA_RUN, needs=(EMA_RUN,)
    ),
    "mmpretrain train experiment=clip_vit-tiny_digits model.towers.image.patch_dropout=0.5": Run(),
    "mmpretrain train distill.teacher=runs/teacher/export distill.feature_weight=0.5 "
    "optim.grad_cache_chunks=2": Run(needs=(TEACHER,)),
    TEACHER_EMBEDDINGS: Run(
        subs={"data/digits/train": f"{SMALL}/train"},
        budget=HYDRA_RUN,
        needs=(MAKE_DIGITS, TEACHER),
        prepare=(_small_digits,),
    ),
    "mmpretrain train distill.teacher=runs/teacher/export distill.cached=true "
    "'data.sources.digits.shards=data/digits-teacher/*.tar'": Run(needs=(TEACHER_EMBEDDINGS,)),
    # -- open_clip towers (path/to/model_cfg.json and my_cfg.json are copies of MODEL_JSON)
    "mmpretrain train model=openclip model.config=path/to/model_cfg.json": Run(
        extra=("hydra.run.dir=runs/openclip",)
    ),
    "mmpretrain finetune task=linear_probe pretrained=logs/x/checkpoints/epoch_32.pt model=openclip "
    "model.config=my_cfg.json data=shards data.root=/data/labelled": Run(
        subs={"/data/labelled": SMALL},
        budget=LINEAR_PROBE,
        needs=(MAKE_DIGITS, "mmpretrain train model=openclip model.config=path/to/model_cfg.json"),
        prepare=(_small_digits, _write_open_clip_trainer_checkpoint),
    ),
    # ViT-B-32 (224 px, 150 M parameters) is shrunk to the 4x192 ViT: the same open_clip factory and loss
    "mmpretrain train loss=siglip model=openclip model.config=ViT-B-32 ...": Run(
        subs={"model.config=ViT-B-32 ...": "model.config=path/to/model_cfg.json"}
    ),
    # -- pretrained weights by name (offline against a hub cache: tests/integration/test_hub_weights.py)
    "mmpretrain train model=openclip model.config=ViT-B-32 model.pretrained=laion2b_s34b_b79k": Skip(HUB),
    "mmpretrain train model=openclip model.config=hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K": Skip(HUB),
    "mmpretrain train model.towers.image.model_name=resnet50 model.towers.image.pretrained=true": Skip(HUB),
    "mmpretrain train model.towers.image.model_name=hf-hub:timm/resnet50.a1_in1k": Skip(HUB),
    (
        "mmpretrain train model.towers.image.model_name=resnet50 "
        "model.towers.image.pretrained_path=/weights/resnet50.safetensors"
    ): Run(
        subs={"/weights/resnet50.safetensors": "weights/resnet10t.safetensors", "=resnet50": "=resnet10t"},
        prepare=(_write_timm_weights,),
    ),
    # -- losses and scale
    "mmpretrain train experiment=siglip_digits": Run(),
    "mmpretrain train loss.tiled=true data.batch_size=16384": Run(
        subs={"data.batch_size=16384": "data.batch_size=64 loss.tile_size=16"}  # 4 x 4 tiles
    ),
    "mmpretrain train data.batch_size=512 optim.grad_cache_chunks=8": Run(
        subs={"data.batch_size=512": "data.batch_size=64"}  # micro-batches of 8
    ),
    # resnet50 -> the digits model's resnet10t (same timm loading and locking, a fraction of the compute)
    "mmpretrain train model.towers.image.model_name=resnet50 "
    "model.towers.image.pretrained_path=/weights/resnet50.safetensors "
    "'model.towers.image.lock={unlocked_groups: 0, freeze_norm_stats: true}'": Run(
        subs={"/weights/resnet50.safetensors": "weights/resnet10t.safetensors", "=resnet50": "=resnet10t"},
        prepare=(_write_timm_weights,),
    ),
    "mmpretrain train 'model.towers.image.lock={unlocked_groups: 2}' model.towers.image.lr_scale=0.1 "
    "optim.layer_decay=0.8": Run(),
    # -- several processes
    "mmpretrain train trainer=ddp trainer.devices=4": Run(subs={"trainer.devices=4": DDP_ON_CPU}),
    "mmpretrain train trainer=ddp trainer.devices=4 trainer.precision=bf16-mixed": Run(
        subs={"trainer.devices=4": DDP_ON_CPU}
    ),
    # trainer=fsdp: ViT-L-14 shrunk to the 4x192 ViT (the same open_clip factory and sharding plan)
    "mmpretrain train trainer=fsdp trainer.devices=8 trainer.precision=bf16-mixed model=openclip "
    "model.config=ViT-L-14": Run(
        subs={"trainer.devices=8": DDP_ON_CPU, "model.config=ViT-L-14": "model.config=path/to/model_cfg.json"}
    ),
    "mmpretrain train trainer=fsdp trainer.devices=8 trainer.precision=bf16-true "
    "trainer.strategy.mixed_precision='{param_dtype: bfloat16, reduce_dtype: float32}' "
    "trainer.strategy.activation_checkpointing=true trainer.strategy.cpu_offload=true": Run(
        subs={"trainer.devices=8": DDP_ON_CPU}
    ),
    "srun mmpretrain train trainer=fsdp_multinode trainer.num_nodes=4 trainer.devices=8 "
    "hydra.run.dir=/shared/runs/big": Skip(SLURM),
    "torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE --rdzv-backend static --master-addr $HEAD "
    "--master-port 29500 -m mmpretrain.cli train trainer=ddp_multinode trainer.num_nodes=2 trainer.devices=8 "
    "hydra.run.dir=/shared/runs/clip1": Skip(SEVERAL_NODES),
    "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$HEAD --master_port=29500 "
    "-m mmpretrain.cli train trainer=ddp_multinode trainer.num_nodes=2 trainer.devices=8 "
    "hydra.run.dir=/shared/runs/big": Skip(SEVERAL_NODES),
    "srun mmpretrain train trainer=ddp_multinode trainer.num_nodes=2 trainer.devices=8 "
    "hydra.run.dir=/shared/runs/clip1": Skip(SLURM),
    "srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 mmpretrain train trainer=ddp_multinode "
    "trainer.num_nodes=2 trainer.devices=8 hydra.run.dir=/shared/runs/big": Skip(SLURM),
    # -- resume, debug callbacks, fault injection
    "mmpretrain train hydra.run.dir=runs/clip1 resume=auto": Run(
        extra=("callbacks.step_checkpoint.every_n_train_steps=3",)  # keeps step0000003.ckpt for the next one
    ),
    "mmpretrain train ... resume=runs/clip1/checkpoints/step0001000.ckpt": Run(
        subs={"... ": "callbacks.step_checkpoint.every_n_train_steps=3 ", "step0001000": "step0000003"},
        needs=("mmpretrain train hydra.run.dir=runs/clip1 resume=auto",),
    ),
    "mmpretrain train +callbacks.record._target_=mmpretrain.training.callbacks.RecordBatches "
    "+callbacks.record.dirpath='${paths.output_dir}/rec'": Run(),
    "mmpretrain train ... +callbacks.nan._target_=mmpretrain.training.callbacks.InjectNaN "
    "'+callbacks.nan.steps=[3,4]' "
    "+callbacks.nan.rank=1": Run(subs={"... ": f"trainer=ddp {DDP_ON_CPU} "}),  # rank 1 exists
    # -- audio and three modalities (the spoken digits need espeak-ng)
    "mmpretrain train experiment=spoken_digits_clap": Run(
        requires=("espeak-ng",), needs=("mmpretrain data spoken-digits out=DIR",)
    ),
    "mmpretrain train experiment=moving_digits_clip": Run(
        extra=(f"data.root={MOVING}", "hydra.run.dir=runs/video"),
        requires=("espeak-ng",),
        needs=("mmpretrain data moving-digits out=DIR",),
    ),
    "mmpretrain train experiment=moving_digits_clip model.towers.video.pooling=mean": Run(
        extra=(f"data.root={MOVING}",),
        requires=("espeak-ng",),
        needs=("mmpretrain data moving-digits out=DIR",),
    ),
    "mmpretrain train experiment=moving_digits_quadmodal": Run(
        extra=(f"data.root={MOVING}", f"data.spoken_root={SPOKEN}", f"data.digits_root={DIGITS}"),
        requires=("espeak-ng",),
        needs=("mmpretrain data moving-digits out=DIR", "mmpretrain data spoken-digits out=DIR"),
    ),
    (
        "mmpretrain finetune task=linear_probe task.modality=video pretrained=runs/video/export "
        "data=moving_digits"
    ): Run(
        extra=(f"data.root={MOVING}",),
        budget=FINETUNE,
        requires=("espeak-ng",),
        needs=("mmpretrain train experiment=moving_digits_clip",),
    ),
    "mmpretrain train experiment=scenes_clip": Run(
        extra=(f"data.root={SCENES}",), needs=("mmpretrain data scenes out=DIR",)
    ),
    # -- captioning (README "Captioning"): CoCa on the small scenes, few captions scored
    "mmpretrain train experiment=scenes_coca hydra.run.dir=runs/scenes_coca": Run(
        extra=(f"data.root={SCENES}", *CAPTIONING), needs=("mmpretrain data scenes out=DIR",)
    ),
    "mmpretrain caption ckpt=runs/scenes_coca/export in=data/scenes/val out=captions.jsonl": Run(
        subs={"data/scenes": SCENES},
        extra=("max_len=8",),
        budget=HYDRA_RUN,
        needs=("mmpretrain train experiment=scenes_coca hydra.run.dir=runs/scenes_coca",),
        expect=("captioned 100 inputs", "CIDEr-D"),
    ),
    "mmpretrain eval ckpt=runs/scenes_coca/export data=scenes": Run(
        extra=(f"data.root={SCENES}", *CAPTIONING),
        budget=EVAL,
        needs=("mmpretrain train experiment=scenes_coca hydra.run.dir=runs/scenes_coca",),
        expect=("val/caption/CIDEr-D",),
    ),
    "mmpretrain finetune task=caption pretrained=runs/scenes_clip/export data=scenes": Run(
        extra=(f"data.root={SCENES}", *CAPTIONING),
        budget=FINETUNE,
        needs=("mmpretrain train experiment=scenes_clip hydra.run.dir=runs/scenes_clip",),
        expect=("caption/CIDEr-D",),
    ),
    "mmpretrain caption ckpt=PATH in=FOLDER_OR_SHARDS out=captions.jsonl": Skip(
        USAGE + "`mmpretrain caption ckpt=runs/scenes_coca/export in=data/scenes/val ...`"
    ),
    # -- visual question answering on the scenes (README "Visual question answering")
    SCENES_CLIP: Run(extra=(f"data.root={SCENES}",), needs=("mmpretrain data scenes out=DIR",)),
    "mmpretrain finetune task=vqa pretrained=runs/scenes_clip/export data=scenes": Run(
        extra=(f"data.root={SCENES}",), budget=FINETUNE, needs=(SCENES_CLIP,), expect=("val/vqa_accuracy",)
    ),
    "mmpretrain finetune task=vqa pretrained=runs/scenes_clip/export data=scenes "
    "task.inputs=question_only": Run(extra=(f"data.root={SCENES}",), budget=FINETUNE, needs=(SCENES_CLIP,)),
    "mmpretrain finetune task=vqa task.answer_mode=rank pretrained=runs/scenes_coca/export data=scenes": Run(
        extra=(f"data.root={SCENES}", *RANK),
        budget=FINETUNE,
        needs=("mmpretrain train experiment=scenes_coca hydra.run.dir=runs/scenes_coca",),
        expect=("val/vqa_accuracy",),
    ),
    "mmpretrain finetune task=vqa task.answer_mode=rank pretrained=runs/scenes_clip/export data=scenes": Run(
        extra=(f"data.root={SCENES}", *RANK),
        budget=FINETUNE,
        needs=(SCENES_CLIP,),
        expect=("val/vqa_accuracy",),
    ),
    "mmpretrain finetune task=vqa pretrained=hf-hub:ORG/REPO data=scenes": Skip(
        HUB + "; offline in tests/integration/test_vqa.py"
    ),
    "mmpretrain finetune task=vqa pretrained=model model=tiny model.towers.image.model_name=resnet18 "
    "model.towers.image.pretrained=true data=scenes": Skip(
        HUB + "; offline in tests/integration/test_vqa.py"
    ),
    "mmpretrain data shards in=/data/vqa.csv out=/data/vqa_shards": Run(
        subs={"/data/": "own/"},
        budget=HYDRA_RUN,
        prepare=(_write_vqa_table,),
        expect=("converted into own/vqa_shards",),
    ),
    "mmpretrain finetune task=vqa pretrained=runs/scenes_clip/export data=shards "
    "data.root=/data/vqa_shards": Run(
        subs={"/data/": "own/"},
        budget=FINETUNE,
        needs=(SCENES_CLIP, "mmpretrain data shards in=/data/vqa.csv out=/data/vqa_shards"),
        expect=("val/vqa_accuracy",),
    ),
    "mmpretrain train experiment=digits_trimodal": Run(
        extra=("hydra.run.dir=runs/trimodal",),
        requires=("espeak-ng",),
        needs=("mmpretrain data spoken-digits out=DIR",),
    ),
    "mmpretrain eval ckpt=runs/trimodal/export data=spoken_digits": Run(
        budget=EVAL,
        requires=("espeak-ng",),
        needs=("mmpretrain train experiment=digits_trimodal",),
        expect=("audio_text zero-shot top-1: 0.",),
    ),
    # -- sweeps
    "mmpretrain train -m optim.lr=1e-4,3e-4,1e-3 loss=infonce,siglip": Run(
        extra=("hydra.sweep.dir=runs/train/multirun/grid",), budget=SWEEP, expect=("6 runs, best first",)
    ),
    "mmpretrain sweep-summary runs/train/multirun/<date>_<time>": Run(
        subs={"<date>_<time>": "grid"},
        budget=(),
        needs=("mmpretrain train -m optim.lr=1e-4,3e-4,1e-3 loss=infonce,siglip",),
        expect=("6 runs, best first",),
    ),
    "mmpretrain train hparams_search=digits_optuna hydra.sweeper.n_trials=20": Run(
        subs={"n_trials=20": "n_trials=2"}, budget=SWEEP, expect=("2 runs, best first",)
    ),
    "mmpretrain train hparams_search=digits_optuna 'data.batch_size=choice(64,128)'": Run(
        subs={"choice(64,128)": "choice(16,32)"},
        extra=("hydra.sweeper.n_trials=2",),
        budget=SWEEP,
        expect=("2 runs, best first",),
    ),
    (
        "mmpretrain train -m hydra/launcher=slurm hydra.launcher.partition=gpu trainer=gpu optim.lr=1e-4,3e-4"
    ): Skip(SLURM),
    # -- object storage: each runs against an in-process S3 server in tests/integration/test_object_storage.py
    # (and the converter's out=s3:// in tests/unit/test_storage_shards.py)
    "mmpretrain data digits out=s3://my-bucket/digits": Skip(STORE),
    "mmpretrain data shards in=pairs.csv out=s3://my-bucket/shards/mine": Skip(STORE),
    (
        "mmpretrain train data.root=s3://my-bucket/digits paths.remote=s3://my-bucket/runs/clip1 resume=auto"
    ): Skip(STORE),
    "mmpretrain eval ckpt=s3://my-bucket/runs/clip1/checkpoints/last.ckpt": Skip(STORE),
    "mmpretrain export ckpt=s3://my-bucket/runs/clip1/checkpoints/last.ckpt out=clip1-export": Skip(STORE),
    "mmpretrain finetune task=linear_probe pretrained=s3://my-bucket/runs/clip1/export": Skip(STORE),
}


def _test_id(command: str) -> str:
    return command.removeprefix("mmpretrain ")


def command_line(command: str, case: Run, run_dir: str) -> list[str]:
    """The arguments after ``mmpretrain`` that run ``command`` here."""
    text = command
    for old, new in case.subs.items():
        assert old in text, f"substitution {old!r} is not in {command!r}"
        text = text.replace(old, new)
    args = shlex.split(text)
    assert args[0] == "mmpretrain", command
    args = args[1:] + list(case.extra)
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    args += [b.format(run=run_dir) for b in case.budget if b.split("=", 1)[0] not in keys]
    return args


def _mmpretrain(workdir: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _params():
    for command, case in COMMANDS.items():
        marks = []
        if isinstance(case, Skip):
            marks.append(pytest.mark.skip(reason=case.reason))
        elif case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        yield pytest.param(command, marks=marks, id=_test_id(command))


# -- tests -----------------------------------------------------------------------------------------
def test_every_readme_command_has_an_entry():
    commands = readme_commands(README.read_text())
    assert len(commands) > 20, "the parser found too few commands in README.md"
    missing = [c for c in commands if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in commands]
    assert not missing, (
        "README.md shows commands that tests/integration/test_readme_commands.py does not run: add each to "
        "COMMANDS with a Run(...) (placeholders -> real paths, a budget) or a Skip(reason):\n  "
        + "\n  ".join(missing)
    )
    assert not stale, "COMMANDS has entries no longer in README.md; remove them:\n  " + "\n  ".join(stale)


def test_the_parser_joins_continuations_strips_comments_and_unescapes_tables():
    text = (
        "```bash\nmmpretrain train a=1 \\\n  'b={x: 1}'   # a comment\nmake demo   # not ours\nsrun "
        "mmpretrain train c=2\n```\n| x | `mmpretrain finetune task=a\\|b` |\nprose "
        "`mmpretrain.load_pretrained(DIR)` and `mmpretrain data` and `mmpretrain train a=1 'b={x: 1}'`\n"
        "```python\nmmpretrain train d=3\n```\n"
    )
    assert readme_commands(text) == [
        "mmpretrain train a=1 'b={x: 1}'",
        "srun mmpretrain train c=2",
        "mmpretrain finetune task=a|b",
        "mmpretrain data",
    ]


def test_budget_leaves_the_commands_own_values():
    case = Run(subs={"trainer.devices=4": DDP_ON_CPU}, extra=("hydra.run.dir=runs/x",))
    args = command_line("mmpretrain train trainer=ddp trainer.devices=4", case, "runs/readme/0")
    assert args == [
        "train",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "hydra.run.dir=runs/x",
        "debug=fast",
        "callbacks.plots=null",
    ]


class Runner:
    """Runs README commands in one scratch directory, each at most once (later ones read earlier files)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def run(self, command: str) -> subprocess.CompletedProcess:
        if command in self.results:
            return self.results[command]
        case = COMMANDS[command]
        assert isinstance(case, Run), f"{command!r} is skipped here; nothing can depend on it"
        for dep in case.needs:
            if self.run(dep).returncode != 0:
                pytest.fail(f"`{command}` reads what `{dep}` writes, and that command failed")
        for prepare in case.prepare:
            prepare(self.workdir)
        index = list(COMMANDS).index(command)
        run_dir = f"runs/readme/{index:02d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", _test_id(command))[:60]
        args = command_line(command, case, run_dir)
        try:
            proc = _mmpretrain(self.workdir, args)
        except subprocess.TimeoutExpired as e:
            out, err = (
                x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                for x in (e.stdout, e.stderr)
            )
            proc = subprocess.CompletedProcess(e.cmd, -1, out, f"{err}\ntimed out after {TIMEOUT_S} s")
        proc.args = ["mmpretrain", *args]
        self.results[command] = proc
        return proc


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    workdir = tmp_path_factory.mktemp("readme")
    for placeholder in ("path/to/model_cfg.json", "my_cfg.json"):  # the README's model-config JSON names
        (workdir / placeholder).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODEL_JSON, workdir / placeholder)
    return Runner(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("command", list(_params()))
def test_readme_command_runs(runner, command):
    case = COMMANDS[command]
    missing = [tool for tool in case.requires if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")
    proc = runner.run(command)
    output = (proc.stdout or "") + (proc.stderr or "")
    assert proc.returncode == 0, (
        f"README command `{command}`\nran as `{shlex.join(proc.args)}` in {runner.workdir}\n"
        f"exit status {proc.returncode}; last output:\n{output[-4000:]}"
    )
    for text in case.expect:
        assert text in output, f"`{command}` should print {text!r}; it printed:\n{output[-3000:]}"
