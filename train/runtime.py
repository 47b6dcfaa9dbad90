"""The process a run trains in: rank, device, threads, seeds, RNG states and AMP.

One process on CPU or one GPU, or a rank under ``torchrun`` (``WORLD_SIZE`` set: NCCL on
CUDA, gloo on CPU). The RNG states are what a checkpoint stores per rank so that
``--resume`` continues the random sequence exactly.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from facegate.train.config import ConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def setup_runtime() -> Runtime:
    """Join the process group when launched by torchrun; pick this rank's device.

    CPU threads: all cores, shared evenly by the ranks of this machine.
    """
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Runtime(rank=rank, world_size=world_size, device=device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states(rt: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective under DDP: all ranks call it)."""
    state = rng_state()
    if not rt.distributed:
        return [state]
    gathered: list[Any] = [None] * rt.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor,
                 rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of every rank, concatenated in rank order (as is, on one process)."""
    if not rt.distributed:
        return embeddings, labels
    emb = [torch.empty_like(embeddings) for _ in range(rt.world_size)]
    lab = [torch.empty_like(labels) for _ in range(rt.world_size)]
    dist.all_gather(emb, embeddings.contiguous())
    dist.all_gather(lab, labels.contiguous())
    return torch.cat(emb), torch.cat(lab)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp``: bf16, or fp16 where bf16 is unsupported, on GPU.

    ``auto`` uses it where there is one and trains in fp32 on CPU; ``on`` requires it and
    refuses a CPU device instead of silently training in fp32; ``off`` never uses it.
    """
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp == "on":
            raise ConfigError(f"train.amp on needs a CUDA device, this run is on {device.type} "
                              "(auto: mixed precision where there is a GPU, fp32 elsewhere)")
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
