"""Data-parallel runs over ``torch.distributed`` with a replicated model.

Curvature over sharded training data needs nothing from here: every
:class:`~pushforward.curvature.GGN` / :class:`~pushforward.curvature.EmpiricalFisher` sums over
its rank's shard and all-reduces (their ``process_group`` argument). This package gathers
per-example results over a sharded evaluation set: :func:`evaluate`.

Forward-mode AD through ``DistributedDataParallel`` or FSDP is not supported upstream (PyTorch
issues 182641 and 182661), so pass the module inside a DDP wrapper (``ddp_model.module``).
"""

from pushforward.distributed.evaluate import evaluate

__all__ = ["evaluate"]
