"""Every config file loads, names a valid network and data preset, and documents how to run it."""

import glob
import importlib
import os
import sys

import pytest

from aia_jax import data, models
from aia_jax.data.config import clip_length
from aia_jax.errors import UserError
from aia_jax.train.run import check_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
FILES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def test_every_experiment_has_a_config():
    for dataset in ("sthv1", "sthv2", "diving48", "egtea1", "egtea2", "egtea3"):
        for net in ("c2d", "tsm", "c2d_cinst", "c2d_stinc", "tsm_cinst", "tsm_stinc"):
            assert f"{dataset}_{net}_r50" in FILES
    assert "sthv1_i3d_cinst_r50" in FILES and "default" in FILES


@pytest.mark.parametrize("name", FILES)
def test_config(name):
    module = importlib.import_module(f"configs.{name}")
    doc = module.__doc__
    assert f"python train.py --config configs/{name}.py" in doc
    assert "Expected result" in doc
    c = module.get_config()
    models.parse_name(c.model.name)
    assert c.model.depth in (14, 50, 101)
    assert c.model.num_segments == c.data.num_segments
    check_config(c)  # every field is one the trainer knows, with a valid value
    c.data.num_segments += 1  # one number for network and data
    assert c.model.num_segments == c.data.num_segments
    assert clip_length(c.data) == c.model.num_segments  # dense3d clips (I3D) too
    for field in (
        "lr",
        "reference_batch_size",
        "momentum",
        "weight_decay",
        "schedule",
        "clip_grad_norm",
        "partial_bn",
        "warmup_epochs",
    ):
        assert field in c.optimizer
    for field in (
        "batch_size",
        "grad_accum_steps",
        "num_epochs",
        "dtype",
        "seed",
        "init_from",
        "log_every_steps",
        "checkpoint_every_steps",
        "eval_every_epochs",
        "keep_checkpoints",
        "distributed",
    ):
        assert field in c
    if c.data.source != "synthetic":
        resolved = data.resolve(c.data)  # the preset exists and fills the lists
        assert resolved.train_list and resolved.val_list and resolved.num_classes > 0


def _default():
    from configs import default

    return default.get_config()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_epoch", 0.25, "config.num_epoch: no such field (did you mean config.num_epochs?)"),
        ("optimizer.weight_dacay", 0.0,
         "config.optimizer.weight_dacay: no such field (did you mean "
         "config.optimizer.weight_decay?)"),
        ("model.dropuot", 0.1, "config.model.dropuot: no such field (did you mean "
         "config.model.dropout?)"),
        ("distributed.num_process", 2, "config.distributed.num_process: no such field (did "
         "you mean config.distributed.num_processes?)"),
        ("zzz", 1, "config.zzz: no such field"),
        ("optimizer.clip_grad_norm", -1.0,
         "config.optimizer.clip_grad_norm -1.0: expected a number >= 0 (0 = off)"),
        ("optimizer.reference_batch_size", 0,
         "config.optimizer.reference_batch_size 0: expected a positive number"),
        ("optimizer.lr_steps", (20, 20),
         "config.optimizer.lr_steps (20, 20): expected epochs in increasing order"),
    ],
)  # fmt: skip
def test_check_config_rejects(field, value, message):
    """A misspelt field in a config file (the command line's are ml_collections' errors) or a
    bad value is one line naming it, before anything is built."""
    c = _default()
    parent, _, name = field.rpartition(".")
    node = c[parent] if parent else c
    with node.unlocked():
        node[name] = value
    with pytest.raises(UserError) as e:
        check_config(c)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_check_config_leaves_data_fields_to_the_data_package():
    c = _default()
    c.optimizer.clip_grad_norm = 0.0  # off
    c.optimizer.lr_steps = (10, 20.5)
    with c.data.unlocked():
        c.data.not_a_trainer_field = 1
    check_config(c)
