"""Scale-out: process setup, device mesh, DDP/FSDP2, Ulysses sequence parallelism, memory savers.

Models are written for one device; `parallelize` applies all of this from outside, in a fixed order
(see parallelize.py and docs/parallel.md).
"""

from frameloom.parallel.env import DistEnv, destroy_distributed, init_distributed, is_distributed
from frameloom.parallel.parallelize import Parallelized, parallelize, unwrap
from frameloom.parallel.plan import ParallelPlan, plan_parallel

__all__ = [
    "DistEnv",
    "ParallelPlan",
    "Parallelized",
    "destroy_distributed",
    "init_distributed",
    "is_distributed",
    "parallelize",
    "plan_parallel",
    "unwrap",
]
