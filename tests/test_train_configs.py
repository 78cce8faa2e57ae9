"""Every config file loads, names a valid network and data preset, and documents how to run it."""

import glob
import importlib
import os
import sys

import pytest

from aia_jax import data, models

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
    c.data.num_segments += 1  # one number for network and data
    assert c.model.num_segments == c.data.num_segments
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
