"""Evaluation of a converted release checkpoint against the tests' PyTorch implementation.

The whole user path, end to end: a checkpoint written by `torch.save` as the release's training
script writes it → `python -m aia_jax.convert torch2flax` → model directory → `evaluate` on a
frame-folder dataset (1 clip x 1 centre crop). The expected logits are computed here without
aia_jax's data code, following the release's test pipeline: frame files decoded with PIL
(`Image.open(path).convert('RGB')`), 1-based segment-centre frames (`int(tick / 2 + tick * i)`,
all frame 1 for videos of T frames or fewer), a centre crop at `int(round((H - h) / 2))`, `/255`
and ImageNet mean/std, then the PyTorch network. The frames are already at the configured resize
size, so no resampling is involved and the crops are exactly the decoded pixels.
"""

import os
from collections import OrderedDict

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from aia_jax import data, evaluate  # noqa: E402
from aia_jax.convert.__main__ import main as convert_main  # noqa: E402
from tests import torch_reference  # noqa: E402

NAME, DEPTH, WIDTH = "TSM_CinST_BN", 14, 8
T, CLASSES, CROP = 4, 5, 32
FRAME = (36, 44)  # (h, w) of the frame files = the configured resize: no resampling
# Frames per video: fewer than T and exactly T (the release then repeats frame 1), a little more
# than T, and longer videos whose segment centres are far apart.
NUM_FRAMES = (3, 4, 5, 9, 11, 17, 30)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def write_release_checkpoint(path):
    """A randomized reference network saved as the release's training script saves it."""
    ref = torch_reference.build(
        NAME, num_classes=CLASSES, num_segments=T, depth=DEPTH, dropout=0.5, width=WIDTH
    )
    torch_reference.randomize_(ref, seed=3)
    state = OrderedDict(("module." + k, v) for k, v in ref.state_dict().items())
    optimizer = {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]}
    torch.save(
        {
            "epoch": 12,
            "arch": f"resnet{DEPTH}",
            "state_dict": state,
            "optimizer": optimizer,
            "best_prec1": 41.5,
        },
        path,
    )
    return ref.eval()


def write_frames(root):
    """Frame folders of textured JPEGs, different in every frame and every video."""
    rng = np.random.default_rng(0)
    lines = []
    for i, n in enumerate(NUM_FRAMES):
        folder = os.path.join(root, "frames", f"v{i}")
        os.makedirs(folder)
        for f in range(n):
            blocks = rng.integers(0, 256, (FRAME[0] // 4, FRAME[1] // 4, 3), dtype=np.uint8)
            img = np.kron(blocks, np.ones((4, 4, 1), np.uint8))
            Image.fromarray(img).save(os.path.join(folder, f"img_{f + 1:05d}.jpg"), quality=90)
        lines.append(f"v{i} {n} {(3 * i + 1) % CLASSES}")
    with open(os.path.join(root, "val_list.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def release_val_offsets(num_frames, num_segments):
    """The release's validation frames, 1-based (TSN `_get_val_indices` with new_length 1)."""
    if num_frames > num_segments:
        tick = num_frames / float(num_segments)
        offsets = [int(tick / 2.0 + tick * x) for x in range(num_segments)]
    else:
        offsets = [0] * num_segments
    return [o + 1 for o in offsets]


def release_input(root, offsets_of=release_val_offsets, shift=(0, 0)):
    """`[N, T, 3, CROP, CROP]` float32 network input of every video, as the release builds it."""
    clips = []
    for i, n in enumerate(NUM_FRAMES):
        frames = []
        for p in offsets_of(n, T):
            path = os.path.join(root, "frames", f"v{i}", f"img_{p:05d}.jpg")
            with Image.open(path) as image:
                frames.append(np.asarray(image.convert("RGB")))
        x = np.stack(frames)  # [T, H, W, 3] uint8
        top = int(round((x.shape[1] - CROP) / 2.0)) + shift[0]
        left = int(round((x.shape[2] - CROP) / 2.0)) + shift[1]
        clips.append(x[:, top : top + CROP, left : left + CROP])
    x = np.stack(clips).astype(np.float32) / 255.0
    x = (x - MEAN) / STD
    return np.ascontiguousarray(np.transpose(x, (0, 1, 4, 2, 3)))  # [N, T, 3, h, w]


def torch_logits(ref, x):
    with torch.no_grad():
        return ref(torch.from_numpy(x)).numpy()


def rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("release_parity")
    ref = write_release_checkpoint(root / "ckpt.best.pth.tar")
    code = convert_main(
        [
            "torch2flax",
            "--checkpoint",
            str(root / "ckpt.best.pth.tar"),
            "--name",
            NAME,
            "--num-segments",
            str(T),
            "--output",
            str(root / "model"),
        ]
    )
    assert code == 0
    write_frames(str(root / "data"))
    c = data.get_config()
    c.source = "frames"
    c.root = str(root / "data")
    c.media_dir = "frames"
    c.val_list = "val_list.txt"
    c.filename_template = "img_{:05d}.jpg"
    c.num_classes = CLASSES
    c.num_segments = T
    c.test_clips = "single"
    c.test_crops = 1
    c.resize = FRAME
    c.crop_size = CROP
    c.num_workers = 0
    c.flip_map = []
    return ref, str(root / "model"), c


def test_sampling_rule_by_hand():
    # The rule as the release computes it, on numbers worked out by hand.
    assert release_val_offsets(3, 4) == [1, 1, 1, 1]
    assert release_val_offsets(4, 4) == [1, 1, 1, 1]
    assert release_val_offsets(5, 4) == [1, 2, 4, 5]  # tick 1.25: 0.625, 1.875, 3.125, 4.375
    assert release_val_offsets(9, 4) == [2, 4, 6, 8]  # tick 2.25: 1.125, 3.375, 5.625, 7.875
    assert release_val_offsets(30, 4) == [4, 12, 19, 27]  # tick 7.5: 3.75, 11.25, 18.75, 26.25


def test_evaluation_reproduces_release_logits(converted):
    ref, model_dir, cfg = converted
    root = cfg.root
    want = torch_logits(ref, release_input(root))  # [N, K]
    n = len(NUM_FRAMES)

    results = {
        b: evaluate.evaluate(cfg, [model_dir], batch_size=b, return_view_logits=True)
        for b in (1, 3, 8)
    }
    r = results[8]
    assert r["view_logits"].shape == (1, n, 1, CLASSES)
    np.testing.assert_array_equal(r["index"], np.arange(n))
    np.testing.assert_array_equal(r["label"], [(3 * i + 1) % CLASSES for i in range(n)])
    assert r["metrics"]["num_videos"] == n and r["metrics"]["num_skipped"] == 0
    assert r["protocol"]["views"] == 1

    got = r["view_logits"][0, :, 0]
    assert rel_err(got, want) < 1e-5, (got, want)
    for i in range(n):  # per video too, so that no video hides behind the others' norm
        assert rel_err(got[i], want[i]) < 1e-5, (i, got[i], want[i])
    np.testing.assert_array_equal(r["scores"], got)  # one view, one checkpoint: the logits
    np.testing.assert_array_equal(r["predictions"], want.argmax(-1))
    top1 = float(np.mean(want.argmax(-1) == r["label"]))
    assert r["metrics"]["top1"] == pytest.approx(top1)

    # The batch size changes nothing: same scores bit for bit, same top-1 and metrics.
    for b in (1, 3):
        other = results[b]
        np.testing.assert_array_equal(other["index"], r["index"])
        np.testing.assert_array_equal(other["label"], r["label"])
        np.testing.assert_array_equal(other["scores"], r["scores"])
        np.testing.assert_array_equal(other["predictions"], r["predictions"])
        assert other["metrics"] == r["metrics"]

    # The comparison is sharp: the predictions vary, and a wrong frame choice (0-based offsets
    # read as 1-based files, i.e. one frame later) or a crop one pixel off is far outside the
    # tolerance.
    assert len(np.unique(want.argmax(-1))) > 1

    def one_later(num_frames, num_segments):
        return [min(p + 1, num_frames) for p in release_val_offsets(num_frames, num_segments)]

    assert rel_err(torch_logits(ref, release_input(root, one_later)), want) > 1e-3
    assert rel_err(torch_logits(ref, release_input(root, shift=(1, 0))), want) > 1e-3
    assert rel_err(torch_logits(ref, release_input(root, shift=(0, 1))), want) > 1e-3
