"""One training process among several: wrapping, reductions and whole-model state.

Only ``torch.distributed`` here (the process group is set up by whoever launched the
processes: Ray Train, datagen/train/ray_train.py); the recipe (trainer.py) calls these
so it reads the same for one process and for many.

- ``ddp``: ``DistributedDataParallel``; every process holds the whole model, gradients
  are averaged in the backward of the last micro-batch (``no_sync`` before it).
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each decoder layer (the
  classes the model names in ``_no_split_modules``) and on the root; parameters,
  gradients and AdamW state are sharded; gradient sync is switched off for all but the
  last micro-batch (``set_requires_gradient_sync``).

Checkpoints hold *full* (unsharded) state dicts, gathered to rank 0's CPU memory
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict``), so a
checkpoint is one ``state.pt`` whatever the strategy. Not covered: sharded (per-rank)
checkpoints, which a model whose full state does not fit one host's memory would need;
hybrid sharding across nodes; mixed-precision parameter storage (parameters stay
float32; CUDA runs the forward in bf16 autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Place:
    """Where this process sits: its rank in the process group, and which data parts it
    reads (normally its own rank out of ``world``). One process may read several parts
    (``parts=(0, 1), num_parts=2``): it then sees the very global batch that two workers
    would, which is how a multi-worker run is reproduced (and tested) on one process."""

    rank: int = 0
    world: int = 1
    parts: tuple[int, ...] = (0,)
    num_parts: int = 1
    strategy: str = "ddp"

    @staticmethod
    def worker(rank: int, world: int, strategy: str) -> Place:
        return Place(rank=rank, world=world, parts=(rank,), num_parts=world, strategy=strategy)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def wrap(model: Any, place: Place, device: str) -> Any:
    """The model ready for the strategy (unchanged on one process). Build the optimizer after."""
    if not place.distributed:
        return model
    import torch

    if place.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        names = set(getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in names]
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


@contextlib.contextmanager
def grad_sync(model: Any, place: Place, *, sync: bool) -> Iterator[None]:
    """Let the backward inside all-reduce gradients only when ``sync`` (the last micro-batch)."""
    if not place.distributed or sync:
        if place.distributed and place.strategy == "fsdp":
            model.set_requires_gradient_sync(True)
        yield
    elif place.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        yield
    else:
        with model.no_sync():
            yield


def all_sum(values: list[float], place: Place, device: str) -> list[float]:
    """Element-wise sum over all processes (identity on one process)."""
    if not place.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def full_state(model: Any, opt: Any, place: Place) -> tuple[dict[str, Any], dict[str, Any]]:
    """Whole-model and optimizer state on CPU, as one process would have it. A collective
    under fsdp (every rank calls it); only rank 0's result is complete there."""
    if place.strategy == "fsdp" and place.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), opt.state_dict()


def load_full_state(model: Any, opt: Any, model_state: dict[str, Any], opt_state: dict[str, Any],
                    place: Place) -> None:
    """The inverse of ``full_state``: every rank passes the whole state, keeps its shard."""
    if place.strategy == "fsdp" and place.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=opt_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(model_state)
    opt.load_state_dict(opt_state)


def full_model_state(model: Any, place: Place) -> dict[str, Any]:
    """Whole-model weights on CPU (a collective under fsdp; complete on rank 0)."""
    if place.strategy == "fsdp" and place.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def barrier(place: Place) -> None:
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()
