"""Training on several processes with PyTorch's own engines: ``torchrun``'s environment, the
process group, each rank's share of the data, the trained model wrapped with DDP or FSDP2
(``fully_shard`` per decoder layer, then the root), reductions of metrics, and the full state
dicts checkpoints are written from.

    torchrun --standalone --nproc_per_node 2 -m fastalign train dpo --parallelism fsdp

One process (no ``WORLD_SIZE`` above 1 in the environment and no process group) is the same
code with every collective a no-op. The trainers keep the plain Hugging Face model for saving
and state dicts and run their forward passes through ``Processes.wrap``'s root module, so DDP's
gradient all-reduce and FSDP2's unshard hooks fire (see ``CausalLMAdapter.forward_with_head``).

Checkpoints hold full (gathered) state dicts, written by rank 0 in the single-process format, so
a run resumes with any world size and either engine. The price is that rank 0 gathers the whole
model and optimizer state in CPU memory while saving; PyTorch's sharded distributed checkpoint
would avoid that, but its metadata file is read with ``pickle``, and fastalign never executes
code from a file it reads back.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from .config import PARALLELISMS


def launched_world_size() -> int:
    """The world size ``torchrun`` (or another launcher) announced, 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch "
                         "with torchrun --nproc_per_node N") from None


def local_device(device: torch.device) -> torch.device:
    """``device`` for this process: under a launcher, CUDA means this rank's own GPU
    (``LOCAL_RANK``); the CPU stays the CPU."""
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def resolve_device(name: str | None) -> torch.device:
    """The device ``--device NAME`` asks for (checked), by default CUDA when there is one;
    under ``torchrun``, ``cuda`` is this rank's GPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU (use --device cpu)")
    return local_device(chosen)


@dataclass
class Processes:
    """This process's place among the training processes, and the collectives the trainers
    use. ``world_size == 1``: single-process training, every method a no-op or the identity."""
    rank: int = 0
    world_size: int = 1
    parallelism: str = "ddp"

    @classmethod
    def setup(cls, parallelism: str, device: torch.device, timeout: float = 600.0) -> Processes:
        """Joins the launcher's process group (initializing it when the launcher's environment
        asks for more than one process: gloo on the CPU, nccl on CUDA), or uses the one the
        caller initialized. ``timeout``: seconds a collective waits for a stalled rank before
        the process group fails it (torch's own default is 30 minutes).

        Raises:
            ValueError: an unknown ``parallelism``, or a CUDA model on another GPU than this
                rank's ``LOCAL_RANK``.
        """
        import torch.distributed as dist

        if parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got "
                             f"{parallelism!r}")
        initialized = dist.is_available() and dist.is_initialized()
        if not initialized and launched_world_size() > 1:
            if device.type == "cuda":
                wanted = local_device(torch.device("cuda"))
                if device != wanted:
                    raise ValueError(f"the model is on {device} but this rank's GPU is "
                                     f"{wanted} (LOCAL_RANK); move it there before training")
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
            initialized = True
        if not initialized or dist.get_world_size() == 1:
            return cls(parallelism=parallelism)
        return cls(dist.get_rank(), dist.get_world_size(), parallelism)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- data ---------------------------------------------------------------------------------
    def share_bounds(self, count: int) -> tuple[int, int]:
        """``(start, end)`` of this rank's contiguous share of ``count`` items: shares differ by
        one at most and follow the rank order; one is empty when there are fewer items than
        ranks."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    # -- collectives --------------------------------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over ranks (a new tensor)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (sizes may differ)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        sizes = [None] * self.world_size
        dist.all_gather_object(sizes, tensor.shape[0])
        padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, value) -> list:
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def on_main(self, work):
        """Runs ``work()`` on rank 0 only (files, logs) and returns its result there (None
        elsewhere); an exception there is raised on every rank, so none waits forever in the
        next collective."""
        if not self.distributed:
            return work()
        result, failure = None, None
        if self.is_main:
            try:
                result = work()
            except Exception as error:  # re-raised below, after the others have heard of it
                failure = error
        message = self.gather_objects(None if failure is None else
                                      f"{type(failure).__name__}: {failure}")[0]
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"rank 0 failed: {message}")
        return result

    # -- models -------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, precision: str = "fp32", *,
             per_layer: bool = True) -> torch.nn.Module:
        """The module to run forward passes through: ``model`` itself on one process;
        ``DistributedDataParallel(model)``; or ``model`` sharded in place by FSDP2, each
        decoder layer (``_no_split_modules``) its own unit, then the root (embeddings, final
        norm, head), parameters in bf16 for ``precision="bf16"`` with float32 gradient
        reduction. ``per_layer=False``: one unit (a small module, PPO's value head)."""
        if not self.distributed:
            return model
        if self.parallelism == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        return self.shard(model, precision, per_layer=per_layer)

    def shard(self, model: torch.nn.Module, precision: str = "fp32", *,
              per_layer: bool = True, frozen: bool = False) -> torch.nn.Module:
        """``model`` sharded in place by FSDP2 (see ``wrap``); frozen models too (a reference,
        a teacher: ``frozen=True``) with ``parallelism="fsdp"``, replicated otherwise. FSDP2
        keeps a root unit gathered after its forward for the backward it expects; a frozen
        model has none, so its root (embeddings, head) is resharded after each forward."""
        if not self.distributed or self.parallelism != "fsdp":
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if hasattr(model, "peft_config"):
            raise NotImplementedError("parallelism='fsdp' with a PEFT (LoRA) model is not "
                                      "supported yet; use parallelism='ddp'")
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if precision == "bf16" else MixedPrecisionPolicy())
        for layer in decoder_layers(model) if per_layer else []:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy, **({"reshard_after_forward": True} if frozen else {}))
        return model

    def no_sync(self, roots: list[torch.nn.Module], last: bool):
        """DDP skips its gradient all-reduce on the micro-batches before an update's last
        (the gradients keep accumulating locally); a no-op otherwise."""
        stack = contextlib.ExitStack()
        for root in roots if not last else []:
            if hasattr(root, "no_sync"):
                stack.enter_context(root.no_sync())
        return stack

    # -- state dicts --------------------------------------------------------------------------
    def model_state(self, model: torch.nn.Module) -> dict | None:
        """The full state dict of an FSDP2-sharded ``model`` on rank 0's CPU ({} on the other
        ranks; every rank must call it); None when the model is not sharded (it is saved as
        it is)."""
        if not self.sharded(model):
            return None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        # A tied weight comes back under each of its names, as separate copies that
        # save_pretrained would write twice: keep the name the unsharded model saves.
        aliases = ({name for name, _ in model.named_parameters(remove_duplicate=False)}
                   - {name for name, _ in model.named_parameters()})
        return {name: value for name, value in state.items() if name not in aliases}

    def module_state(self, module: torch.nn.Module) -> dict:
        """``module``'s whole state dict: gathered on rank 0 when sharded (every rank must
        call it), else its own."""
        state = self.model_state(module)
        return module.state_dict() if state is None else state

    def load_module_state(self, module: torch.nn.Module, state: dict) -> None:
        if self.sharded(module):
            self.load_model_state(module, state)
        else:
            module.load_state_dict(state)

    def load_model_state(self, model: torch.nn.Module, state: dict
                         ) -> tuple[list[str], list[str]]:
        """Loads the full ``state`` (read by every rank) into the sharded ``model``; returns
        the ``(missing, unexpected)`` names."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict)
        names = set(model.state_dict())
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                    strict=False))
        return sorted(names - set(state)), sorted(set(state) - names)

    def optimizer_state(self, modules: torch.nn.Module, optimizer) -> dict:
        """The optimizer's full state keyed by parameter names (independent of the world
        size), gathered on rank 0's CPU. Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        return get_optimizer_state_dict(modules, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=self.distributed))

    def load_optimizer_state(self, modules: torch.nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)
        set_optimizer_state_dict(modules, optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    @staticmethod
    def sharded(model: torch.nn.Module) -> bool:
        from torch.distributed.fsdp import FSDPModule
        return isinstance(model, FSDPModule)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model: the modules whose class is one of its
    ``_no_split_modules`` (what transformers' own FSDP wrapping uses)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in inner.modules() if type(m).__name__ in names and m is not inner]
    if not layers:
        raise ValueError(f"{type(inner).__name__} names no decoder layer class in "
                         "_no_split_modules, so FSDP2 cannot shard it layer by layer; use "
                         "parallelism='ddp'")
    return layers

