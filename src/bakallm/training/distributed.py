"""Data parallelism over the ranks of a torchrun launch: the process group, the wrapped model (DDP or
FSDP2) and the few collectives the trainer needs.

The model code knows nothing of this: parallelism is applied from outside, as torchtitan does. A
process started without torchrun is a world of one rank, where every method is a no-op, so the
trainer has a single code path.

Rows: with N ranks of B rows each, the global batch has N x B rows and rank r owns rows
r x B .. r x B + B - 1 (see bakallm.data.batching). Checkpoints hold the global rows (the carried
states of all ranks gathered on rank 0), so a run can resume on any N x B split of the same rows.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bakallm.acceleration import resolve_device
from bakallm.errors import UserError

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    launched: bool = False  # started by torchrun, with a process group (even of one rank)

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, metrics and the progress bar."""
        return self.rank == 0

    def rows(self, rows_per_rank: int) -> range:
        """This rank's rows of the global batch."""
        return range(self.rank * rows_per_rank, (self.rank + 1) * rows_per_rank)

    def device(self, name: str) -> torch.device:
        """The device of this rank for `--device name`, made current: rank r of a node takes GPU r (LOCAL_RANK)."""
        device = resolve_device(name)
        if not self.launched or device.type == "cpu":
            return device
        if device.type != "cuda":
            raise UserError(f"Training across ranks supports --device cuda or cpu, not {name}; pass one of those.")
        if device.index is not None and self.world_size > 1:
            raise UserError(
                f"--device {name} would put every rank on one GPU; pass --device cuda and each rank takes the GPU of its LOCAL_RANK."
            )
        if self.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"Rank {self.rank} has LOCAL_RANK {self.local_rank} but this node has {torch.cuda.device_count()} GPUs; start at most that many ranks per node."
            )
        device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)
        return device

    # ----- the model -----
    def wrap(self, model: nn.Module, device: torch.device, fsdp: bool, units: list[nn.Module]) -> nn.Module:
        """The module to call for training: `model` under DDP, or `model` itself sharded in place by
        FSDP2, each of `units` (its blocks) first.

        Build the optimizer after this call: FSDP2 replaces the parameters with sharded ones.
        """
        if fsdp and not self.launched:
            raise UserError(
                "--fsdp shards the model across the ranks of a torchrun launch; start with `torchrun --nproc-per-node N -m bakallm train ...` or drop --fsdp."
            )
        if not self.launched:
            return model
        if fsdp:
            fully_shard = _fully_shard()
            # The model's outputs (the carried state) are views of its activations; it never changes them
            # in place, which is what FSDP2's warning about returned views guards against.
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            for unit in units:
                fully_shard(unit)
            fully_shard(model)
            return model
        # The carried state is passed to forward, never registered; the only buffers, the rotary tables, are
        # the same on every rank, so DDP need not broadcast them before each forward.
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = {
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers": False
        }
        return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)

    @staticmethod
    def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Forward and backward of a micro-batch inside this context all-reduce the gradients only when `enabled`.

        Gradient accumulation enables it on the last micro-batch of a step only.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if enabled else model.no_sync()
        if _is_fsdp(model):
            model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    # ----- collectives -----
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all ranks."""
        if self.launched:
            torch.distributed.all_reduce(tensor)
        return tensor

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Rank 0 of each node runs the block first (e.g. to fill the token cache), the other ranks after it."""
        if self.launched and self.local_rank != 0:
            torch.distributed.barrier()
        yield
        if self.launched and self.local_rank == 0:
            torch.distributed.barrier()

    def gather_rows(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Every rank's batch-first tensors concatenated in rank order on rank 0 (on the CPU); None elsewhere."""
        if not self.launched:
            return {name: tensor.cpu() for name, tensor in tensors.items()}
        gathered = {}
        for name, tensor in tensors.items():
            local = (
                tensor.detach().cpu().contiguous()
            )  # CPU: the rows go to disk, and rank 0's GPU need not hold them all
            parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.is_main else None
            torch.distributed.gather(local, parts, dst=0)
            if self.is_main:
                gathered[name] = torch.cat(parts)
        return gathered if self.is_main else None

    def gather_objects(self, value: Any) -> list[Any] | None:
        """Every rank's `value` in rank order on rank 0; None elsewhere."""
        if not self.launched:
            return [value]
        values = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, values, dst=0)
        return values

    # ----- checkpoints -----
    def full_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0, gathered from the shards under FSDP2; None elsewhere."""
        if _is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return weights if self.is_main else None
        return model.state_dict() if self.is_main else None

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """optimizer.state_dict() of the whole model on rank 0 (the format of a single process); None elsewhere."""
        if not _is_fsdp(model):
            return optimizer.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if not self.is_main:
            return None
        index = {name: number for number, name in enumerate(_parameter_names(model, optimizer))}
        return {
            "state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [
                {**group, "params": [index[name] for name in group["params"]]} for group in by_name["param_groups"]
            ],
        }

    @staticmethod
    def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Loads a state written by `full_optimizer_state` (each FSDP2 rank keeps its shard of it)."""
        if not _is_fsdp(model):
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _parameter_names(model, optimizer)
        by_name = {
            "state": {names[number]: value for number, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[number] for number in group["params"]]} for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def launch() -> Iterator[Distributed]:
    """The ranks of this process: from torchrun's environment with a process group, destroyed on any exit."""
    if "WORLD_SIZE" not in os.environ:
        yield Distributed()
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; start the ranks with torchrun, which sets them all."
        )
    world = Distributed(
        world_size=int(os.environ["WORLD_SIZE"]),
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        launched=True,
    )
    # NCCL for CUDA tensors; gloo for CPU tensors (CPU training, and the state rows gathered for checkpoints).
    nccl = torch.cuda.is_available() and torch.distributed.is_nccl_available()
    torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl" if nccl else "gloo")
    try:
        yield world
    finally:
        torch.distributed.destroy_process_group()


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(
            f"--fsdp needs FSDP2's fully_shard from PyTorch 2.6 or newer, and this is PyTorch {torch.__version__}; upgrade torch or drop --fsdp to train with DDP."
        ) from None
    return fully_shard


def _is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")  # what FSDP2 adds to the modules it shards


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order of optimizer.state_dict()'s numbering."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
