"""The device side of the data: global arrays from host batches, and pixel normalisation."""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(video: Any, dtype: Any = None) -> Any:
    """uint8 RGB → `(x / 255 - mean) / std` (ImageNet), computed in float32, cast to `dtype`."""
    import jax.numpy as jnp  # noqa: PLC0415 (worker processes never need JAX)

    dtype = dtype or jnp.float32
    x = jnp.asarray(video).astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return x.astype(dtype)


def to_global(batch: Any, mesh: Any, axis: str = "data") -> Any:
    """Host batches of every process → global `jax.Array`s split over `axis` of `mesh`.

    The leading (batch) dimension of each leaf is sharded over the mesh axis, the rest replicated;
    the global batch is the processes' batches concatenated in process order.
    """
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
