"""Every config file loads, names a valid network and data preset, and documents how to run it."""

import glob
import importlib
import os
import re
import sys

import pytest

from aia_jax import data, models
from aia_jax.data import presets
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
    assert clip_length(c.data) == c.model.num_segments
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


# The reference's "Reported" paragraph (docs/official-aia.md): 8 frames, 1 clip, 1 crop, ResNet-50.
# AIA(TSN) is C2D with an AIA unit, AIA(TSM) TSM with one; the reference does not say whether
# that unit is CinST or STinC, so both configs quote the figure and say so.
REPORTED = {
    ("sthv1", "c2d"): ("48.5 % top-1 / 77.2 % top-5", "AIA(TSN)"),
    ("sthv2", "c2d"): ("60.3 % top-1 / 86.4 % top-5", "AIA(TSN)"),
    ("diving48", "c2d"): ("79.3 %", "AIA(TSN)"),
    ("diving48", "tsm"): ("79.4 %", "AIA(TSM)"),
    ("egtea1", "c2d"): ("about 63.7 %", "AIA(TSN)"),
    ("egtea2", "c2d"): ("about 62.1 %", "AIA(TSN)"),
    ("egtea3", "c2d"): ("about 61.5 %", "AIA(TSN)"),
}
CLASSES = {"sthv1": 174, "sthv2": 174, "diving48": 48, "egtea1": 106, "egtea2": 106, "egtea3": 106}
EXPERIMENTS = [name for name in FILES if name != "default"]


def _reported_paragraph() -> str:
    with open(os.path.join(ROOT, "docs", "official-aia.md"), encoding="utf-8") as f:
        text = f.read()
    return " ".join(text[text.index("Reported (") :].split("\n\n")[0].split())


def _expected(doc: str) -> str:
    """The docstring's 'Expected result' paragraph, on one line."""
    return " ".join(doc[doc.index("Expected result") :].split("\n\n")[0].split())


def test_reported_table_is_the_references():
    text = _reported_paragraph()
    for number, network in REPORTED.values():
        for value in re.findall(r"\d+\.\d", number):
            assert value in text
        assert network in text
    for value in re.findall(r"\d+\.\d %?", text.split("Parameter count")[0]):
        assert any(value.rstrip(" %") in number for number, _ in REPORTED.values()), value


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_expected_result_quotes_the_reference(name):
    """Each figure sits on the networks the reference gives it for, with the unit left open."""
    dataset, backbone, *unit = name[: -len("_r50")].split("_")
    expected = _expected(importlib.import_module(f"configs.{name}").__doc__)
    if unit and unit[0] in ("cinst", "stinc") and (dataset, backbone) in REPORTED:
        number, network = REPORTED[(dataset, backbone)]
        assert f"Expected result: {number} reported for {network}" in expected, expected
        assert "1 clip × 1 crop" in expected
        assert "does not say whether that AIA unit is CinST or STinC" in expected
    else:
        assert re.search(r"no(t reported| 3D result) in the release", expected), expected
        assert not re.search(r"\d %", expected), expected


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_docstring_recipe_and_commands(name):
    """Only Something-Something V1's recipe is in the reference: the others say they reuse it;
    and the ImageNet conversion command is runnable as written (the preset's class count)."""
    module = importlib.import_module(f"configs.{name}")
    doc, c = module.__doc__, module.get_config()
    dataset = name.split("_")[0]
    first = doc.splitlines()[0]
    if dataset == "sthv1":
        assert first.endswith("the release's recipe.")
    else:
        assert first.endswith("Something-Something V1's recipe."), first
        assert "recipe for Something-Something V1 only; it is reused" in " ".join(doc.split())
    assert data.resolve(c.data).num_classes == CLASSES[dataset]
    assert f"--name {c.model.name} --num-classes {CLASSES[dataset]}\n" in doc
    assert f"--output models/{name}_in1k`" in doc
    assert f"--config.init_from=models/{name}_in1k" in doc
    assert f"--checkpoint runs/{name} " in doc and f"--workdir runs/{name} " in doc
    assert f"preset `{c.data.preset}`" in doc


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_recipe_is_the_references(name):
    """docs/official-aia.md's training recipe, in every experiment config."""
    c = importlib.import_module(f"configs.{name}").get_config()
    o = c.optimizer
    assert (o.lr, o.reference_batch_size, o.momentum, o.weight_decay) == (0.01, 40, 0.9, 1e-4)
    assert (o.schedule, tuple(o.lr_steps), o.lr_decay) == ("step", (20, 40), 0.1)
    assert o.warmup_epochs == 0
    assert (o.clip_grad_norm, o.partial_bn, c.num_epochs) == (20.0, False, 50.0)
    assert (c.model.dropout, c.model.num_segments, c.model.depth) == (0.5, 8, 50)
    d = c.data
    assert (tuple(d.resize), d.resize_short_side, d.crop_size) == ((240, 320), 0, 224)
    assert tuple(d.scales) == (1.0, 0.875, 0.75, 0.66) and d.flip and d.first_frame == 1
    assert d.sampling == "tsn"  # the 3D form too: dense 8×8 clips would loop on short videos


def test_presets_of_the_papers_datasets():
    """Class counts, 1-based frame files and flip label maps: the left/right pairs on
    Something-Something (V1 and V2 number their classes alike), none elsewhere."""
    pairs = ((86, 87), (93, 94), (166, 167))
    for name, classes, flip in (
        ("something_v1", 174, pairs),
        ("something_v2", 174, pairs),
        ("diving48", 48, ()),
        ("egtea_split1", 106, ()),
        ("egtea_split2", 106, ()),
        ("egtea_split3", 106, ()),
    ):
        p = presets.get(name)
        assert (p.source, p.num_classes, p.flip_pairs) == ("frames", classes, flip), name
        assert p.filename_template.format(1) in ("00001.jpg", "000001.jpg"), name
        assert p.train_list and p.val_list and p.media_dir, name
    for k in (1, 2, 3):
        p = presets.get(f"egtea_split{k}")
        assert (p.train_list, p.val_list) == (f"train_split{k}.txt", f"test_split{k}.txt")
    assert presets.get("egtea") == presets.get("egtea_split1")
