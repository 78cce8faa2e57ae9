"""Shared pieces of the experiment configs: the release's recipe and the config fields.

Every config file under configs/ is `get_config()` returning an `ml_collections.ConfigDict`
with these fields (override any of them on the command line, e.g. `--config.optimizer.lr=0.02`):

- `model`: `name` (a release name, see `aia_jax.models.valid_names()`), `depth`, `width`,
  `dropout`, `num_segments`, `attention_impl`, `remat` (recompute each block's activations in
  the backward pass: less memory, more time).
- `data`: `aia_jax.data.get_config()` fields (source, preset, root, lists, sampling, sizes, …).
- `optimizer`: `lr` given per `reference_batch_size` clips and scaled linearly to the global
  `batch_size`; `momentum`, `weight_decay`, `schedule` ('step' with `lr_steps` epochs and
  `lr_decay`, or 'cosine'), `warmup_epochs`, `clip_grad_norm`, `partial_bn`.
- `batch_size` (global, over every device of every host), `grad_accum_steps`, `num_epochs`,
  `eval_every_epochs`, `checkpoint_every_steps`, `log_every_steps`, `keep_checkpoints`,
  `dtype` ('float32' | 'bfloat16'), `seed`, `init_from` (a model directory from
  `python -m aia_jax.convert`, e.g. ImageNet weights), `distributed` (multi-host settings).

The fields and their defaults are `aia_jax.train.config.get_config()`'s; the trainer rejects
any other (a misspelt field would otherwise be ignored).
"""

from __future__ import annotations

import ml_collections

from aia_jax.train import config as train_config


def release_recipe(
    name: str, preset: str, *, root: str = "", depth: int = 50
) -> ml_collections.ConfigDict:
    """The release's Something-Something V1 recipe (docs/official-aia.md) for network `name`.

    The reference gives no recipe for any other dataset; their configs reuse this one unchanged.

    SGD, momentum 0.9, lr 0.01 per 40 clips (4 GPUs × 10), weight decay 1e-4, 50 epochs,
    ×0.1 at epochs 20 and 40, gradient clipping at global norm 20, dropout 0.5, no partial BN,
    8 segments (the trainer's defaults, `aia_jax.train.config.get_config()`), 240×320 frames,
    multi-scale 224 crops with flip (label map of the preset).
    """
    c = train_config.get_config()
    c.model.name = name
    c.model.depth = depth
    c.data.source = "frames"
    c.data.preset = preset
    c.data.root = root
    c.data.num_workers = 8
    # The 3D form samples as the 2D forms do (8 segments), not dense 8×8 clips
    # (`data.sampling='dense3d'`): those span 64 frames, which most clips of these datasets do
    # not have (Something-Something V1: a few seconds at 12 fps), and a dense clip loops past a
    # video's end, playing part of it out of order; on classes told apart by their direction
    # that is a wrong input, not augmentation. The same frames also make the 3D form comparable
    # with the 2D ones.
    return c
