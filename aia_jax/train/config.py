"""The trainer's config fields and their defaults: the release's Something-Something recipe.

`configs/common.py` builds every experiment config from `get_config()`, and `run.check_config`
rejects a field that is not here, so that a misspelt one in a config file is an error rather than
silently ignored. The `data` block is `aia_jax.data.get_config()`, checked by `data.resolve`.
"""

from __future__ import annotations

import ml_collections

from aia_jax import errors


def get_config() -> ml_collections.ConfigDict:
    """Every trainer field, with the release's values (docs/official-aia.md).

    SGD, momentum 0.9, lr 0.01 per 40 clips (4 GPUs × 10), weight decay 1e-4, 50 epochs,
    ×0.1 at epochs 20 and 40, gradient clipping at global norm 20, dropout 0.5, no partial BN,
    8 segments. `model.name` is left '' for the experiment to set.
    """
    from aia_jax import data, models  # only when called: importing this module stays light

    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        dict(name="", depth=50, width=64, dropout=0.5, num_segments=8)
    )
    # How the attention is computed ('fused' or 'xla'); same parameters, see bench/RESULTS.md.
    c.model.attention_impl = models.DEFAULT_IMPL
    # Recompute each backbone block in the backward pass (mmaction2's `with_cp`): a training
    # step keeps only the blocks' inputs, for about one more forward pass (bench/RESULTS.md §4).
    c.model.remat = False
    c.data = data.get_config()
    # One number: `--config.data.num_segments=16` changes the network's T as well.
    c.model.num_segments = c.data.get_ref("num_segments")
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


def unknown_field(config: ml_collections.ConfigDict) -> str | None:
    """The first field of `config` that `get_config()` lacks, as a one-line message, or None.

    The `data` block is left to `aia_jax.data.resolve`.
    """
    return errors.unknown_field(config, get_config(), skip=("data",))
