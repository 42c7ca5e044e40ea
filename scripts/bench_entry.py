"""Child process of the benchmarks: run one trainer with the same neutral instrumentation.

    python scripts/bench_entry.py {ours,open_clip} --record FILE [--digits DIR] -- TRAINER ARGS

Both trainers get the same global optimizer-step hook (``time.perf_counter`` after every
``optimizer.step``), written to ``--record`` as JSON at exit, so steady-state throughput is
measured the same way for both. For ``open_clip`` the model-config JSONs of
``benchmarks/models`` are registered with ``open_clip.add_model_config`` first (open_clip_train
takes registry names only), and with ``--digits DIR`` its per-epoch evaluation also prints the
zero-shot top-1 on the digits val split (open_clip_train's own zero-shot is ImageNet only),
computed with mmpretrain's evaluation functions: ``BENCH zeroshot epoch=E top1=X``; with
``--scenes DIR`` the retrieval over every val caption: ``BENCH retrieval epoch=E mean_R@1=X``.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parent.parent


def install_step_recorder(path: str) -> None:
    """``steps``: seconds since this recorder started at each optimizer step's end; ``step_epochs``:
    the same moments as ``time.time()``, which the parent compares with its launch and exit times."""
    pid, start = os.getpid(), time.perf_counter()
    steps: list[float] = []
    epochs: list[float] = []

    def hook(optimizer, args, kwargs):
        steps.append(time.perf_counter() - start)
        epochs.append(time.time())

    register_optimizer_step_post_hook(hook)

    def dump():
        if os.getpid() == pid:  # not from forked data-loader workers
            peak = (
                torch.cuda.max_memory_allocated()
                if torch.cuda.is_available() and torch.cuda.is_initialized()
                else None
            )
            Path(path).write_text(json.dumps({"steps": steps, "step_epochs": epochs, "peak_gpu_bytes": peak}))

    atexit.register(dump)


def read_val_split(root: Path) -> list[dict[str, bytes]]:
    """The samples of ``root/val`` as ``{extension: bytes}``, read with tarfile (independent of
    webdataset's version)."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((root / "val").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.rsplit(".", 1)
                samples.setdefault(f"{tar.name}/{key}", {})[ext] = tf.extractfile(m).read()
    return list(samples.values())


def read_digits_val(root: Path):
    """(PIL images, labels) of the digits val split."""
    from PIL import Image

    samples = read_val_split(root)
    images = [Image.open(io.BytesIO(s["png"])).convert("RGB") for s in samples]
    return images, torch.tensor([int(s["cls"]) for s in samples])


def read_scenes_val(root: Path):
    """(PIL images, every caption, caption -> image index) of the scenes val split (json ``captions``)."""
    from PIL import Image

    images, captions, owner = [], [], []
    for i, s in enumerate(read_val_split(root)):
        images.append(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        for caption in json.loads(s["json"])["captions"]:
            captions.append(caption)
            owner.append(i)
    return images, captions, torch.tensor(owner)


def patch_open_clip_eval(digits: Path | None, scenes: Path | None) -> None:
    """After open_clip_train's own evaluation, print what ours reports on the same val split, computed
    with mmpretrain's evaluation functions: digits zero-shot top-1, or scenes retrieval over all five
    captions (the papers' protocol; open_clip's own retrieval reads one caption per image)."""
    import open_clip
    import open_clip_train.main as ocm

    from mmpretrain.evaluation import class_embeddings, zero_shot_accuracy
    from mmpretrain.evaluation.retrieval import multi_caption_retrieval
    from mmpretrain.evaluation.zeroshot import read_lines

    if digits is not None:
        images, labels = read_digits_val(digits)
        classnames, templates = read_lines(digits / "classnames.txt"), read_lines(digits / "templates.txt")
    else:
        images, captions, owner = read_scenes_val(scenes)
    original = ocm.evaluate

    @torch.no_grad()
    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        metrics = original(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
        m = model.module if hasattr(model, "module") else model
        was_training = m.training
        m.eval()
        pp = _val_transform(m)
        dev = torch.device(args.device)
        feats = torch.cat(
            [
                m.encode_image(
                    torch.stack([pp(im) for im in images[i : i + 256]]).to(dev), normalize=True
                ).float()
                for i in range(0, len(images), 256)
            ]
        )
        tok = tokenizer or open_clip.get_tokenizer(args.model)

        def encode_prompts(prompts):
            return m.encode_text(tok(prompts).to(dev), normalize=True).float()

        if digits is not None:
            acc = zero_shot_accuracy(
                feats.cpu(), labels, class_embeddings(classnames, templates, encode_prompts).cpu()
            )
            print(f"BENCH zeroshot epoch={epoch} top1={acc['top1']:.4f}", flush=True)
        else:
            texts = torch.cat([encode_prompts(captions[i : i + 256]) for i in range(0, len(captions), 256)])
            res = multi_caption_retrieval(feats.cpu(), texts.cpu(), owner, "image", "text")
            print(
                f"BENCH retrieval epoch={epoch} mean_R@1={res['mean_R@1/image_text']:.4f} "
                f"rsum={res['rsum/image_text']:.2f}",
                flush=True,
            )
        m.train(was_training)
        return metrics

    ocm.evaluate = evaluate


def _val_transform(model):
    import open_clip

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trainer", choices=["ours", "open_clip"])
    p.add_argument("--record", required=True)
    p.add_argument("--digits", default=None, help="digits root: print per-epoch zero-shot (open_clip)")
    p.add_argument(
        "--scenes", default=None, help="scenes root: print per-epoch 5-caption retrieval (open_clip)"
    )
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a, rest = p.parse_args(argv[:cut]), argv[cut + 1 :]
    install_step_recorder(a.record)
    if a.trainer == "ours":
        from mmpretrain.cli import console  # what the `mmpretrain` console script runs

        console(["train", *rest])
    import open_clip

    for configs in (ROOT / "benchmarks" / "models", ROOT / "conf" / "model" / "open_clip"):
        open_clip.add_model_config(str(configs))
    if a.digits or a.scenes:
        patch_open_clip_eval(Path(a.digits) if a.digits else None, Path(a.scenes) if a.scenes else None)
    from open_clip_train.main import main as reference

    reference(rest)


if __name__ == "__main__":
    main()
