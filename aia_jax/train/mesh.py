"""Process group and device mesh: one `data` axis over every device of every host.

Parameters are replicated and batches are sharded along `data`; XLA turns the cross-device means
(the loss, BatchNorm statistics) into all-reduces, so the same program runs on a CPU, one GPU,
several GPUs, several hosts or a TPU slice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from aia_jax.errors import UserError, one_line

DATA_AXIS = "data"

# Environment variables read when the config leaves the process group unset (JAX itself reads
# JAX_COORDINATOR_ADDRESS; the other two are named after it).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def initialize_distributed(cfg: Mapping[str, Any] | None = None) -> None:
    """Joins the multi-host process group when one is configured; a no-op on one host.

    Must run before anything touches a JAX backend. Settings come from `cfg`
    (`coordinator_address`, `num_processes`, `process_id`, `auto`) and otherwise from the
    environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). With
    `auto=True`, JAX's cluster detection (TPU pods, SLURM, Open MPI) fills in those left unset
    (e.g. a fixed coordinator port with the process count and id from SLURM); the set ones are
    passed on as they are.

    Args:
      cfg: the config's `distributed` block, or None.
    """
    cfg = dict(cfg or {})
    address = cfg.get("coordinator_address") or os.environ.get(ENV_COORDINATOR, "")
    num = int(cfg.get("num_processes") or _env_int(ENV_NUM_PROCESSES, 0))
    pid = cfg.get("process_id", -1)
    if pid is None or pid < 0:
        pid = _env_int(ENV_PROCESS_ID, -1)
    auto = bool(cfg.get("auto"))
    if jax.distributed.is_initialized():
        return
    if not address and not auto and (num > 1 or (pid >= 0 and num != 1)):
        # Without it every host would train alone, all into the same workdir.
        raise UserError(
            f"distributed.num_processes {num}, process_id {pid} but no coordinator_address "
            f"(or {ENV_COORDINATOR}): set it to process 0's host:port, or auto=True"
        )
    if address and not auto and num < 1:
        # Else a coordinator without a process count would be ignored: each host alone.
        raise UserError(
            f"distributed.coordinator_address {address!r} but no num_processes (or "
            f"{ENV_NUM_PROCESSES}): set it to the number of processes (1: one host), or "
            "auto=True"
        )
    if ((address and num > 1) or auto) and num > 0 and pid >= num:
        raise UserError(
            f"distributed.process_id {pid} (or {ENV_PROCESS_ID}): expected 0 to {num - 1} "
            f"with num_processes={num}"
        )
    if address and num > 1 and not auto:
        if pid < 0:
            raise UserError(
                f"process_id is required with num_processes={num} (or {ENV_PROCESS_ID})"
            )
        logging.info("Joining %d processes at %s as process %d.", num, address, pid)
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif auto:
        # JAX detects only the arguments left None.
        given = {
            "coordinator_address": address or None,
            "num_processes": num if num > 0 else None,
            "process_id": pid if pid >= 0 else None,
        }
        given = {k: v for k, v in given.items() if v is not None}
        logging.info(
            "Joining the process group found by JAX's cluster detection%s.",
            f" ({', '.join(f'{k}={v}' for k, v in given.items())} as set)" if given else "",
        )
        try:
            jax.distributed.initialize(**given)
        except ValueError as e:  # e.g. 'coordinator_address should be defined.'
            raise UserError(
                f"distributed.auto=True but JAX's cluster detection found no cluster (TPU pod, "
                f"SLURM, Open MPI): {one_line(e)}; set coordinator_address, num_processes and "
                "process_id instead"
            ) from None


def _env_int(name: str, default: int) -> int:
    """The integer in environment variable `name` (`default` when unset or empty)."""
    text = os.environ.get(name, "").strip()
    try:
        return int(text) if text else default
    except ValueError:
        raise UserError(f"environment variable {name}={text!r}: expected an integer") from None


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process).

    The axis is `Auto`, not `Explicit`: the model is written without sharding annotations and
    the compiler propagates the batch sharding through it.
    """
    if devices is None:
        try:  # topology-aware device order (TPU rings); one slice only
            return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), (AxisType.Auto,))
        except ValueError:  # e.g. a multi-slice TPU: plain device order
            devices = jax.devices()
    return Mesh(np.asarray(list(devices)), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters, optimiser state and scalars: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of batches: the leading (example) axis split along `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(
    global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1, name: str = "batch_size"
) -> None:
    """Raises a clear error when the batch cannot be split evenly over devices and processes.

    Args:
      global_batch_size: clips per step over all processes.
      mesh: the device mesh.
      grad_accum_steps: accumulation steps the batch is split into.
      name: the config key the batch size came from, for the message.
    """
    micro, rem = divmod(global_batch_size, grad_accum_steps)
    if rem:
        raise UserError(
            f"{name} {global_batch_size} is not divisible by grad_accum_steps {grad_accum_steps}"
        )
    if micro % mesh.size:
        raise UserError(
            f"{name} {global_batch_size} cannot be split evenly over {mesh.size} devices; pick "
            f"a multiple of {mesh.size}"
            if grad_accum_steps == 1
            else f"each accumulation step takes {micro} clips ({name} {global_batch_size} / "
            f"grad_accum_steps {grad_accum_steps}), which {mesh.size} devices cannot share "
            f"evenly; pick a {name} that is a multiple of devices × grad_accum_steps"
        )
    if global_batch_size % jax.process_count():
        raise UserError(
            f"{name} {global_batch_size} is not divisible by {jax.process_count()} processes"
        )
