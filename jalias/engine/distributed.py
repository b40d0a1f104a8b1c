"""Multi-host runs: one process per host (TPU pod slice, multi-node GPU), under `jax.distributed`.

Two ways to use several hosts, after every process calls `initialize()` once:

- split concepts: each process takes `my_share(items)`, scores them on its local devices and writes its own
  results (nothing to synchronise per step; process 0 can merge the files);
- one concept over all hosts: `Engine(..., devices=jax.devices())` shards the candidate axis over every device of
  every process; each process calls `score` with the same candidates, its devices compute their rows, and the
  IoU rows are gathered so every process holds all of them.

    from jalias.engine.distributed import initialize, my_share
    initialize()                       # reads JAX's usual cluster environment (or pass coordinator/ids)
    for concept in my_share(concepts): ...
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import jax

T = TypeVar("T")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
    """`jax.distributed.initialize` when more than one process is configured; returns (process_id, count).

    With no arguments, JAX's cluster auto-detection applies (TPU, SLURM, Open MPI) and the variables
    JALIAS_COORDINATOR / JALIAS_NUM_PROCESSES / JALIAS_PROCESS_ID are honoured. A single process is a no-op.
    """
    coordinator = coordinator or os.environ.get("JALIAS_COORDINATOR")
    if num_processes is None and "JALIAS_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JALIAS_NUM_PROCESSES"])
    if process_id is None and "JALIAS_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JALIAS_PROCESS_ID"])
    if coordinator or (num_processes or 1) > 1:
        # CPU backends need a collectives implementation for cross-process arrays (GPU/TPU have their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return jax.process_index(), jax.process_count()


def my_share(items: Sequence[T], process_id: int | None = None, count: int | None = None) -> list[T]:
    """Round-robin share of `items` for this process (deterministic; every item goes to exactly one process)."""
    pid = jax.process_index() if process_id is None else process_id
    n = jax.process_count() if count is None else count
    if not 0 <= pid < n:
        raise ValueError(f"process id {pid} is not in [0, {n})")
    return [x for i, x in enumerate(items) if i % n == pid]
