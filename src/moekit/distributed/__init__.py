"""moekit.distributed: expert parallelism on torch.distributed (gloo on CPU, NCCL on GPU).

Import this subpackage explicitly (``import moekit.distributed``); ``import moekit`` does not load it.
See docs/distributed.md for the layout, the communication model and measured numbers.
"""

from .checkpoint import (
    load_distributed_model,
    load_distributed_state,
    read_distributed_config,
    save_distributed_checkpoint,
)
from .comm import ExpertParallelError, all_to_all, check_same_config
from .data_parallel import expert_parameter_names, sync_expert_grads, wrap_ddp
from .groups import ExpertParallelGroups, default_backend, init_distributed, make_groups
from .layer import ExpertParallelMoE, expert_parallel, shard_experts
from .model import ep_moe_classifier

__all__ = [
    "ExpertParallelMoE",
    "ExpertParallelGroups",
    "ExpertParallelError",
    "init_distributed",
    "make_groups",
    "default_backend",
    "expert_parallel",
    "shard_experts",
    "all_to_all",
    "check_same_config",
    "wrap_ddp",
    "sync_expert_grads",
    "expert_parameter_names",
    "save_distributed_checkpoint",
    "load_distributed_state",
    "load_distributed_model",
    "read_distributed_config",
    "ep_moe_classifier",
]
