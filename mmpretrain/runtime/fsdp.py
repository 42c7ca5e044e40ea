"""Fully sharded training (``trainer=fsdp``): Lightning's ``ModelParallelStrategy`` (FSDP2) with the
sharding plan, precision, offload and activation checkpointing taken from the config.

Lightning does the distributed work: its strategy sets up the process group and device mesh,
calls :meth:`ContrastiveModule.configure_model` (which calls :meth:`FSDP2Strategy.shard`), and
saves and loads distributed checkpoints (one file of shards per rank, ``.metadata``, and the
loops/callbacks/datamodule state in ``meta.pt``). What is ours: which modules are sharded (one
FSDP unit per tower block, per tower, per projection), the scalar temperatures that torch's
``fully_shard`` cannot shard (kept whole on every rank, their gradients averaged like DDP's),
BatchNorm statistics taken from rank 0 before each training forward (DDP's ``broadcast_buffers``),
a checkpoint that appears at its final path only once every rank has written its part, and other
sharded entries written beside the model's (the weight EMA's ``ema_state_dict``, Lightning's layout
otherwise), handed back on resume as :class:`ShardedEntry`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from mmpretrain.io import fsync_dir, is_sharded_checkpoint, torch_load_safe
from mmpretrain.runtime import distributed
from mmpretrain.towers.base import BATCH_NORMS

#: What an FSDP2 checkpoint directory holds when complete (DCP writes ``.metadata`` last; Lightning
#: writes ``meta.pt``).
SHARDED_MARKERS = (".metadata", "meta.pt")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (``data_parallel = world size``, no tensor parallelism).

    ``mixed_precision``: null, or ``{param_dtype, reduce_dtype}`` (e.g. ``bfloat16``/``float32``):
    FSDP2's own policy (parameters gathered in ``param_dtype``, gradients reduced in
    ``reduce_dtype``). ``cpu_offload``: keep shards, gradients and optimizer state in host memory.
    ``activation_checkpointing``: recompute every tower's blocks in backward (the towers'
    ``set_grad_checkpointing``). ``reshard_after_forward``: free gathered parameters after forward
    (ZeRO-3; false keeps them until backward, ZeRO-2-like).
    """

    def __init__(
        self,
        mixed_precision: dict[str, str] | None = None,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        self.mixed_precision = dict(mixed_precision) if mixed_precision else None
        self.cpu_offload = bool(cpu_offload)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the model
        super().setup_environment()

    # -- the sharding plan ---------------------------------------------------------------------
    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard a ContrastiveModel in place: each tower block, then each tower (its stem and head),
        each projection, and the root; scalar parameters (temperatures, logit bias) stay whole."""
        from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

        if isinstance(model, FSDPModule):  # configure_model runs again for validate after fit
            return model
        kwargs = self._fully_shard_kwargs()
        for tower in model.towers.values():
            if self.activation_checkpointing:
                tower.set_grad_checkpointing(True)
            for block in tower.blocks():
                fully_shard(block, **kwargs)
            fully_shard(tower, **kwargs)
            # The caption path calls the tower's forward_with_tokens (loss=coca), not its forward:
            # FSDP gathers the tower's own weights around it too.
            register_fsdp_forward_method(tower, "forward_with_tokens")
        for projection in model.projections.values():
            if any(True for _ in projection.parameters()):
                fully_shard(projection, **kwargs)
        running = [b for m in model.modules() if isinstance(m, BATCH_NORMS) for b in m.buffers()]
        if running:  # BatchNorm statistics: rank 0's before every training forward, as DDP broadcasts them
            model.register_forward_pre_hook(
                lambda m, args: distributed.broadcast_(running) if m.training else None
            )
        scalars = {p for p in model.parameters() if p.ndim == 0}
        fully_shard(model, **kwargs, ignored_params=scalars)
        if (
            getattr(model, "decoder", None) is not None
        ):  # caption generation steps the decoder's blocks itself
            register_fsdp_forward_method(model, "generate")
        replicate(scalars)
        return model

    def _fully_shard_kwargs(self) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        kwargs: dict[str, Any] = {
            "mesh": self.device_mesh["data_parallel"],
            "reshard_after_forward": self.reshard_after_forward,
            "offload_policy": OffloadPolicy(),
        }
        if self.cpu_offload:  # pinned host memory only where there is a GPU to copy to
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if self.mixed_precision:
            unknown = set(self.mixed_precision) - {"param_dtype", "reduce_dtype"}
            if unknown:
                raise ValueError(
                    f"trainer.strategy.mixed_precision has unknown keys {sorted(unknown)}; "
                    f"use param_dtype, reduce_dtype (e.g. bfloat16, float32)"
                )
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                **{k: _dtype(v) for k, v in self.mixed_precision.items()}
            )
        return kwargs

    @property
    def saves_sharded(self) -> bool:
        """Whether checkpoints are sharded directories (else one whole file written by rank 0)."""
        return bool(self._save_distributed_checkpoint)

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the sharded towers compute in (``mixed_precision.param_dtype``), or None."""
        name = (self.mixed_precision or {}).get("param_dtype")
        return _dtype(name) if name else None

    def place(self, model: torch.nn.Module) -> None:
        """Move what :meth:`shard` left whole (the scalars, which ``fully_shard`` does not move) to this
        rank's device, for a sharded module the strategy does not set up itself (the weight EMA)."""
        device = self.root_device
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                if not hasattr(t, "to_local") and t.device != device:
                    t.data = t.data.to(device)

    # -- checkpoints: the directory appears complete or not at all -----------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Every rank writes its shards into ``.<name>.tmp``; after a barrier rank 0 renames the
        complete directory to ``<name>`` (replacing an older one) and fsyncs the parent, so a
        crash mid-save leaves the previous checkpoint and a temporary directory that resume ignores."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if storage_options is not None:
            raise TypeError("trainer=fsdp writes its checkpoints itself: storage_options is not supported")
        self.barrier("sharded_checkpoint_start")
        self._save_sharded(checkpoint, tmp)
        self.barrier("sharded_checkpoint_written")
        if self.global_rank == 0:
            _publish(tmp, path)
            if hasattr(self.checkpoint_io, "published"):  # paths.remote: uploaded from the local copy
                self.checkpoint_io.published(path)
        self.barrier("sharded_checkpoint_published")

    def _save_sharded(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Lightning's layout (``state_dict`` and ``optimizer_<i>`` through torch.distributed.checkpoint,
        the rest in ``meta.pt`` by rank 0), and every other entry holding sharded tensors (the weight
        EMA's ``ema_state_dict``) in the same distributed checkpoint, each rank writing its shards."""
        import torch.distributed.checkpoint as dcp

        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state |= {f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}
        state |= {k: checkpoint.pop(k) for k in [k for k, v in checkpoint.items() if _holds_dtensors(v)]}
        dcp.save(state, checkpoint_id=path)
        if self.global_rank == 0:
            torch.save(checkpoint, path / SHARDED_MARKERS[1])

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's restore of the model and optimizers; the checkpoint's other sharded entries are
        handed on as :class:`ShardedEntry` (their owner loads them into tensors sharded like its own)."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded_checkpoint(path):
            checkpoint |= {key: ShardedEntry(path, key) for key in sharded_entries(path)}
        return checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero and Path(filepath).is_dir():
            shutil.rmtree(filepath, ignore_errors=True)
            if getattr(self.checkpoint_io, "mirror", None) is not None:
                self.checkpoint_io.mirror.checkpoint_removed(filepath)
        else:
            super().remove_checkpoint(filepath)


def preload_datamodule_state(datamodule: Any, ckpt_path: str | None) -> None:
    """Hand a sharded checkpoint's data-stream state to the datamodule before ``fit``.

    Lightning's FSDP2 strategy restores a checkpoint only after its setup (the model must be sharded
    first), but that setup already builds and starts the training loader (``configure_optimizers``
    asks for the number of steps), and that loader is the one training uses: without the positions
    its streams would start from the beginning instead of where the checkpointed run stood."""
    if not ckpt_path or not is_sharded_checkpoint(ckpt_path):
        return
    state = torch_load_safe(Path(ckpt_path) / "meta.pt").get(type(datamodule).__qualname__)
    if state:
        datamodule.load_state_dict(state)


def _publish(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.is_dir():
        os.replace(path, old)
    elif path.exists():
        path.unlink()
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


class ShardedEntry:
    """An entry of a sharded checkpoint other than the model and optimizer (``ema_state_dict``), not yet
    read: :meth:`load_into` reads it into a module sharded like the one that saved it."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def load_into(self, module: torch.nn.Module) -> None:
        """Each rank reads its shards of the entry into ``module``'s state (a collective)."""
        import torch.distributed.checkpoint as dcp

        state = {self.key: module.state_dict()}
        dcp.load(state, checkpoint_id=self.path)
        module.load_state_dict(state[self.key], strict=True)


def sharded_entries(path: str | Path) -> list[str]:
    """The entries of a sharded checkpoint's tensors besides ``state_dict`` and ``optimizer_<i>``."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tops = {k.partition(".")[0] for k in keys}
    return sorted(k for k in tops if k != "state_dict" and not k.startswith("optimizer_"))


def replicate(params: Any) -> None:
    """Parameters kept whole on every rank beside the sharded ones (the temperatures, distillation's
    projection heads): their gradients averaged over ranks after each backward, as DDP would."""
    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)


def _holds_dtensors(value: Any) -> bool:
    return isinstance(value, dict) and any(hasattr(v, "to_local") for v in value.values())


def _average_grad(p: torch.Tensor) -> None:
    distributed.all_reduce_mean_(p.grad)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"'{name}' is not a torch dtype; use bfloat16, float16 or float32")  # noqa: TRY004 - a config value
    return dtype


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds FSDP2-sharded parameters."""
    return any(hasattr(p, "to_local") for p in module.parameters())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of a sharded model on every rank, on the CPU (collective:
    every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (the same on every rank) into a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
