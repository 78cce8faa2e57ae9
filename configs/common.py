"""Shared pieces of the experiment configs: the release's recipe and the config fields.

Every config file under configs/ is `get_config()` returning an `ml_collections.ConfigDict`
with these fields (override any of them on the command line, e.g. `--config.optimizer.lr=0.02`):

- `model`: `name` (a release name, see `aia_jax.models.valid_names()`), `depth`, `width`,
  `dropout`, `num_segments`.
- `data`: `aia_jax.data.get_config()` fields (source, preset, root, lists, sampling, sizes, …).
- `optimizer`: `lr` given per `reference_batch_size` clips and scaled linearly to the global
  `batch_size`; `momentum`, `weight_decay`, `schedule` ('step' with `lr_steps` epochs and
  `lr_decay`, or 'cosine'), `warmup_epochs`, `clip_grad_norm`, `partial_bn`.
- `batch_size` (global, over every device of every host), `grad_accum_steps`, `num_epochs`,
  `eval_every_epochs`, `checkpoint_every_steps`, `log_every_steps`, `keep_checkpoints`,
  `dtype` ('float32' | 'bfloat16'), `seed`, `init_from` (a model directory from
  `python -m aia_jax.convert`, e.g. ImageNet weights), `distributed` (multi-host settings).
"""

from __future__ import annotations

import ml_collections

from aia_jax import data, models


def release_recipe(
    name: str, preset: str, *, root: str = "", depth: int = 50
) -> ml_collections.ConfigDict:
    """The release's Something-Something recipe (docs/official-aia.md) for network `name`.

    SGD, momentum 0.9, lr 0.01 per 40 clips (4 GPUs × 10), weight decay 1e-4, 50 epochs,
    ×0.1 at epochs 20 and 40, gradient clipping at global norm 20, dropout 0.5, no partial BN,
    8 segments, 240×320 frames, multi-scale 224 crops with flip (label map of the preset).
    """
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(name=name, depth=depth, width=64, dropout=0.5, num_segments=8)
    )
    # How the attention is computed ('fused' or 'xla'); same parameters, see bench/RESULTS.md.
    c.model.attention_impl = models.DEFAULT_IMPL
    c.data = data.get_config()
    c.data.source = "frames"
    c.data.preset = preset
    c.data.root = root
    c.data.num_segments = 8
    c.data.num_workers = 8
    # One number: `--config.data.num_segments=16` changes the network's T as well.
    c.model.num_segments = c.data.get_ref("num_segments")
    if name.startswith("I3D"):
        # The 3D form reads dense clips: 8 frames, 8 apart (SlowOnly-style 8×8).
        c.data.sampling = "dense3d"
        c.data.clip_len = 8
        c.data.frame_interval = 8
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=0.01,
            reference_batch_size=40,
            momentum=0.9,
            weight_decay=1e-4,
            schedule="step",
            lr_steps=(20, 40),
            lr_decay=0.1,
            warmup_epochs=0.0,
            clip_grad_norm=20.0,
            partial_bn=False,
        )
    )
    c.batch_size = 40
    c.grad_accum_steps = 1
    c.eval_batch_size = 40
    c.num_epochs = 50.0
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 1000
    c.log_every_steps = 50
    c.keep_checkpoints = 2
    c.dtype = "float32"
    c.seed = 0
    # The release starts from torchvision's ImageNet ResNet; convert it once with
    # `python -m aia_jax.convert imagenet --weights resnet50.pth --name NAME --num-classes K
    #  --output DIR` and set this to DIR.
    c.init_from = ""
    # Multi-host: set the three fields (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    # JAX_PROCESS_ID), or `auto=True` for JAX's cluster detection (TPU pods, SLURM, Open MPI).
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, auto=False)
    )
    return c
