"""Serving: predict on one video file or frame folder, and the jax.export round trip."""

import functools
import json
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aia_jax import data, export, modelio, predict
from aia_jax.data import testing
from tests.test_eval_evaluate import CLASSES, S, T, make_model_dir

NAMES = ["waving", "jumping", "running", "sitting"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serving") / "model", seed=2, class_names=NAMES)


@functools.cache
def _reference_fn(checkpoint):
    variables, meta = modelio.load_model(checkpoint)
    model = modelio.create_model(meta)
    fn = jax.jit(lambda x: model.apply(variables, data.normalize(x, jnp.float32), train=False))
    return fn


def reference_logits(checkpoint, clips):
    """The Flax model's logits for uint8 clips (one compile per checkpoint and shape)."""
    return np.asarray(_reference_fn(checkpoint)(clips))


def test_predict_video_file_and_frame_folder(model_dir, tmp_path, capsys):
    video = str(tmp_path / "clip.mp4")
    testing.write_video(video, num_frames=16, video=3, size=(36, 44))
    frames = tmp_path / "frames"
    frames.mkdir()
    for f in range(16):  # names sort naturally, not as strings: 2 before 10
        Image.fromarray(testing.frame_pixels(3, f, (36, 44))).save(frames / f"frame_{f + 1}.png")

    # The clip: segment centres of 16 frames in 4 segments, centre crop.
    clip = predict.read_clip(
        str(frames), T, predict.preprocessing_settings(model_dir, resize=(36, 44), crop_size=S)
    )
    assert clip.shape == (1, T, S, S, 3)
    np.testing.assert_array_equal(testing.frame_ids(clip[0]), [2, 6, 10, 14])

    argv = ["--checkpoint", model_dir, "--resize", "36,44", "--crop-size", str(S), "--top", "3"]
    predict.main([*argv, video])
    printed_video = capsys.readouterr().out
    predict.main([*argv, str(frames)])
    printed_frames = capsys.readouterr().out
    for printed in (printed_video, printed_frames):
        lines = printed.strip().splitlines()
        assert "4 frames (segment centres), centre crop 32x32" in lines[0]
        assert len(lines) == 4 and lines[1].lstrip().startswith("1. ")
        assert all(any(name in line for name in NAMES) for line in lines[1:])

    result = predict.predict(model_dir, str(frames), resize=(36, 44), crop_size=S, top=5)
    expected = reference_logits(model_dir, clip)[0]
    np.testing.assert_allclose(result["logits"], expected, rtol=1e-5, atol=1e-5)
    assert len(result["top"]) == CLASSES  # capped at the number of classes
    assert result["top"][0]["name"] == NAMES[int(np.argmax(expected))]
    probs = [t["probability"] for t in result["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0)

    # A class-name file wins over the names recorded in the model directory.
    names_file = tmp_path / "names.txt"
    names_file.write_text("a\nb\nc\nd\n")
    predict.main([*argv, "--classnames", str(names_file), "--json", str(frames)])
    top = json.loads(capsys.readouterr().out)["top"]
    assert top[0]["name"] in "abcd"


def test_export_round_trip(model_dir, tmp_path, capsys):
    path = str(tmp_path / "model.jaxexport")
    export.main(["--checkpoint", model_dir, "--output", path, "--crop-size", str(S)])
    assert "model.jaxexport" in capsys.readouterr().out
    loaded = export.load_exported(path)
    assert loaded.sidecar["input"]["shape"] == ["b", T, S, S, 3]
    assert loaded.sidecar["input"]["dtype"] == "uint8"
    assert loaded.class_names == NAMES
    clips = np.random.default_rng(0).integers(0, 256, (3, T, S, S, 3), dtype=np.uint8)
    expected = reference_logits(model_dir, clips)
    for batch in (1, 3):  # one artefact, two batch sizes
        logits = loaded(clips[:batch])
        assert logits.shape == (batch, CLASSES) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, expected[:batch], rtol=1e-5, atol=1e-5)
    # An empty batch (jax.export's symbolic sizes are >= 1) gives empty logits, not an error.
    empty = loaded(clips[:0])
    assert empty.shape == (0, CLASSES) and empty.dtype == np.float32
    # What predict reads clips with, for a server to do the same.
    settings = predict.preprocessing_settings(model_dir, crop_size=S)
    assert loaded.sidecar["preprocessing"] == json.loads(json.dumps(settings))
    assert sorted(os.listdir(tmp_path)) == ["model.jaxexport", "model.jaxexport.json"]


def test_export_float_input(model_dir):
    variables, meta = modelio.load_model(model_dir)
    model = modelio.create_model(meta)
    for bad in (0, -3, 2.5):  # jax's own error about negative shapes, or a float crop
        with pytest.raises(export.UserError, match=rf"^crop_size {bad}: expected a positive"):
            export.export_model(model, variables, crop_size=bad)
    exported = export.export_model(model, variables, crop_size=S, input_dtype="float32")
    clips = np.random.default_rng(0).integers(0, 256, (3, T, S, S, 3), dtype=np.uint8)
    normalised = np.asarray(data.normalize(clips, jnp.float32))
    restored = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(
        np.asarray(restored.call(normalised)),
        reference_logits(model_dir, clips),
        rtol=1e-5,
        atol=1e-5,
    )


def test_export_names_unknown_platforms_and_foreign_files(model_dir, tmp_path, capsys):
    path = str(tmp_path / "model.jaxexport")
    argv = ["--checkpoint", model_dir, "--output", path, "--platforms", "cpu,tpux"]
    with pytest.raises(SystemExit) as info:
        export.main(argv)
    assert info.value.code == 2 and not os.path.exists(path)
    assert "platforms 'tpux': expected some of cpu, cuda, rocm, tpu" in capsys.readouterr().err
    garbage = tmp_path / "garbage.jaxexport"
    garbage.write_bytes(b"not an exported model" * 10)
    with pytest.raises(export.UserError, match="garbage.jaxexport: not a model exported by"):
        export.load_exported(str(garbage))


def _tiny_export(n: int) -> jax.export.Exported:
    """A small batch-polymorphic artefact (no network: fast), `[b, n] uint8 -> [b, n]`."""
    (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))
    fn = jax.jit(lambda x: x.astype(jnp.float32) * 2)
    return jax.export.export(fn)(jax.ShapeDtypeStruct((b, n), jnp.uint8))


def _tiny_sidecar(exported, names):
    shape = [d if isinstance(d, int) else str(d) for d in exported.in_avals[0].shape]
    return {"input": {"shape": shape, "dtype": "uint8"}, "class_names": names}


def test_export_overwrite_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "model.jaxexport")
    old = _tiny_export(3)
    export.write_export(path, old, _tiny_sidecar(old, ["a", "b", "c"]))

    # A crash while writing the new pair leaves the old one whole, and no temporary files.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    new = _tiny_export(5)
    monkeypatch.setattr(export.json, "dump", crash)
    monkeypatch.setattr(export.json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        export.write_export(path, new, _tiny_sidecar(new, list("vwxyz")))
    monkeypatch.undo()
    loaded = export.load_exported(path)
    assert loaded.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded(np.ones((2, 3), np.uint8)), np.full((2, 3), 2.0))
    assert sorted(os.listdir(tmp_path)) == ["model.jaxexport", "model.jaxexport.json"]


def test_export_sidecar_of_another_artefact_is_refused(tmp_path):
    path = str(tmp_path / "model.jaxexport")
    old, new = _tiny_export(3), _tiny_export(5)
    export.write_export(path, old, _tiny_sidecar(old, ["a", "b", "c"]))
    side = path + export.SIDECAR_SUFFIX
    sidecar = json.loads(open(side).read())
    # The artefact replaced, the sidecar not (a crash between the two, or a copied artefact):
    # its class names would be shown for another model's logits.
    with open(path, "wb") as f:
        f.write(new.serialize())
    with pytest.raises(export.UserError, match=r"\.json: written for another artefact than .*"):
        export.load_exported(path)
    # A sidecar without a sha256 (written by an older version) is checked by its signature.
    del sidecar["sha256"]
    with open(side, "w") as f:
        json.dump(sidecar, f)
    with pytest.raises(
        export.UserError, match=r"describes uint8 \['b', 3\] clips, but .* \['b', 5\]"
    ):
        export.load_exported(path)
    with open(side, "w") as f:
        f.write('{"input": ')  # truncated
    with pytest.raises(export.UserError, match=r"\.json: not a readable JSON sidecar"):
        export.load_exported(path)
    os.remove(side)  # optional: without it there are no class names
    assert export.load_exported(path).class_names is None
    with pytest.raises(export.UserError, match=r"missing\.jaxexport: exported model not found"):
        export.load_exported(str(tmp_path / "missing.jaxexport"))
    with pytest.raises(export.UserError, match=r": is a directory; --output names the artefact"):
        export.write_export(str(tmp_path), new, {})


def _fails(main, argv, capsys) -> str:
    """The one-line error of a command that must exit with status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_model_json_that_disagrees_with_the_variables_is_refused(model_dir, tmp_path, capsys):
    """Flax would ignore the attention tensors under a plain name (wrong scores, no error) and
    fail deep inside `apply` on a wrong class count."""
    import shutil

    meta = modelio.read_meta(model_dir)
    for change, expected in [
        ({"name": "TSM"}, r"TSM .* unexpected \d+, e\.g\. params/base_model/layer1_0/eft/"),
        ({"num_classes": 9}, r"wrong shape 2, e\.g\. params/new_fc/bias \(4,\) \(\(9,\) expected"),
    ]:
        path = str(tmp_path / next(iter(change)))
        shutil.copytree(model_dir, path)
        modelio.write_meta(path, {**meta, **change})
        with pytest.raises(modelio.UserError, match=f"{path}: its variables are not .*{expected}"):
            modelio.load_model(path)
        line = _fails(predict.main, ["--checkpoint", path, str(tmp_path)], capsys)
        assert "model.json describes" in line


def test_export_refuses_class_names_of_another_length(model_dir, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    path = str(tmp_path / "model.jaxexport")
    argv = ["--checkpoint", model_dir, "--output", path, "--classnames", str(names)]
    line = _fails(export.main, argv, capsys)
    assert line.endswith(
        f"error: --classnames {names}: 3 class names (non-blank lines) for a 4-class model "
        f"({model_dir})"
    )
    assert not os.path.exists(path)
    # The library call, without a file to name.
    with pytest.raises(export.UserError, match="^3 class names for a 4-class model$"):
        export.export_checkpoint(model_dir, path, class_names=["a", "b", "c"])


@pytest.mark.parametrize("stream", [False, True])
def test_predict_names_the_class_names_file_of_another_length(
    model_dir, tmp_path, capsys, monkeypatch, stream
):
    """Refused before any frame is read, naming the flag and the file."""
    from aia_jax.data import decode

    def no_read(*args, **kwargs):
        raise AssertionError("a frame was read before the class names were checked")

    monkeypatch.setattr(decode, "read_video", no_read)
    video = str(tmp_path / "clip.mp4")
    testing.write_video(video, num_frames=8, video=3, size=(36, 44))
    names = tmp_path / "names.txt"
    names.write_text("a\n\nb\nc\n")  # blank lines are skipped: 3 names
    argv = ["--checkpoint", model_dir, "--resize", "36,44", "--crop-size", str(S)]
    argv += ["--classnames", str(names), *(["--stream"] if stream else []), video]
    line = _fails(predict.main, argv, capsys)
    assert f"--classnames {names}: 3 class names (non-blank lines) for a 4-class model" in line
    with pytest.raises(export.UserError, match="^2 class names for a 4-class model$"):
        predict.predict(model_dir, video, class_names=["a", "b"], resize=(36, 44), crop_size=S)


def test_class_names_file_with_a_byte_order_mark(tmp_path):
    """Windows editors start UTF-8 files with a BOM; it is no part of the first class name."""
    names = tmp_path / "names.txt"
    names.write_bytes("\ufeffwaving\nJümping\n".encode())
    assert predict.read_class_names(str(names)) == ["waving", "Jümping"]


def test_predict_rawframes_folder_with_flow_files(model_dir, tmp_path, capsys):
    """TSN/mmaction rawframes keep `img_*` beside `flow_x_*`/`flow_y_*`: only one kind is read."""
    folder = tmp_path / "v_x"
    folder.mkdir()
    for f in range(16):
        Image.fromarray(testing.frame_pixels(3, f, (36, 44))).save(folder / f"img_{f + 1:05d}.png")
        for axis in "xy":
            flow = np.full((36, 44), 255, np.uint8)
            Image.fromarray(flow).save(folder / f"flow_{axis}_{f + 1:05d}.png")
    line = _fails(predict.main, ["--checkpoint", model_dir, str(folder)], capsys)
    assert "several name patterns (flow_x_*.png, flow_y_*.png, img_*.png)" in line
    assert "--filename-template" in line

    settings = predict.preprocessing_settings(
        model_dir, resize=(36, 44), crop_size=S, filename_template="img_{:05d}.png"
    )
    np.testing.assert_array_equal(
        testing.frame_ids(predict.read_clip(str(folder), T, settings)[0]), [2, 6, 10, 14]
    )
    argv = ["--checkpoint", model_dir, "--resize", "36,44", "--crop-size", str(S)]
    predict.main([*argv, "--filename-template", "img_{:05d}.png", str(folder)])
    assert "4 frames (segment centres)" in capsys.readouterr().out
    line = _fails(predict.main, [*argv, "--filename-template", "{:05d}.jpg", str(folder)], capsys)
    assert "no frame file matches the filename template '{:05d}.jpg'" in line


@pytest.mark.parametrize("stream", [False, True])
def test_crop_larger_than_the_resized_frames_is_refused(model_dir, tmp_path, capsys, stream):
    """numpy slicing would cut a box outside the frame short: a 14x10 corner, not a 64x64 crop."""
    video = str(tmp_path / "clip.mp4")
    testing.write_video(video, num_frames=8, video=3, size=(36, 44))
    argv = ["--checkpoint", model_dir, "--resize", "36,44", "--crop-size", "64"]
    line = _fails(predict.main, [*argv, *(["--stream"] if stream else []), video], capsys)
    assert "crop size 64 is larger than the resized frames' short side 36 (resize 36,44)" in line


def test_resize_flag_wins_over_a_workdir_short_side_rule(model_dir, tmp_path):
    """A workdir trained with `resize_short_side` must not silently ignore `--resize H,W`."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / predict.CONFIG_FILE).write_text(
        json.dumps({"data": {"resize_short_side": 40, "crop_size": S}})
    )
    from_config = predict.preprocessing_settings(str(workdir))
    assert predict.eval_geometry(from_config).target_shape(36, 44) == (40, 48)
    asked = predict.preprocessing_settings(str(workdir), resize=(36, 44))
    assert predict.eval_geometry(asked).target_shape(36, 44) == (36, 44)


def _no_model_load(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")

    monkeypatch.setattr(modelio, "load_model", no_load)


def test_export_refuses_a_crop_larger_than_its_resize(model_dir, tmp_path, capsys, monkeypatch):
    """Clips of the sidecar's preprocessing could never feed such an artefact; refused before
    the checkpoint is loaded."""
    import shutil

    _no_model_load(monkeypatch)
    path = str(tmp_path / "model.jaxexport")
    argv = ["--checkpoint", model_dir, "--output", path, "--crop-size", "256"]
    line = _fails(export.main, argv, capsys)
    assert line.endswith(
        f"error: --crop-size 256 is larger than {model_dir}'s preprocessing resize (frames "
        "resized to 240,320): clips cut from its frames can never be that size; give a "
        "--crop-size of at most 240"
    )
    assert not os.path.exists(path)
    # A workdir's short-side rule bounds the crop by that side; its own crop size is checked too.
    workdir = str(tmp_path / "run")
    shutil.copytree(model_dir, workdir)
    config = os.path.join(workdir, predict.CONFIG_FILE)
    with open(config, "w") as f:
        json.dump({"data": {"resize_short_side": 40, "crop_size": S}}, f)
    with pytest.raises(
        export.UserError, match=r"^--crop-size 41 is .*\(short side resized to 40\)"
    ):
        export.export_checkpoint(workdir, path, crop_size=41)
    with open(config, "w") as f:
        json.dump({"data": {"resize": [36, 44], "crop_size": 64}}, f)
    with pytest.raises(export.UserError, match=r"^crop size 64 \(the workdir config's data\."):
        export.export_checkpoint(workdir, path)
    for bad in (0, -3):  # the library call: 0 is no "use the default"
        with pytest.raises(export.UserError, match=f"^crop_size {bad}: expected a positive int"):
            export.export_checkpoint(model_dir, path, crop_size=bad)
    assert not os.path.exists(path)


@pytest.mark.parametrize("top", [0, -1])
def test_predict_refuses_a_top_that_is_not_positive(model_dir, tmp_path, monkeypatch, top):
    """-1 would drop the last class without a word, 0 fail deep inside the printing; both
    refused before the checkpoint is loaded."""
    _no_model_load(monkeypatch)
    expected = f"^top {top}: expected a positive integer$"
    with pytest.raises(predict.UserError, match=expected):
        predict.predict(model_dir, str(tmp_path), top=top)
    with pytest.raises(predict.UserError, match=expected):
        predict.top_classes(np.zeros(CLASSES, np.float32), NAMES, top)
    from aia_jax import stream

    with pytest.raises(predict.UserError, match=expected):  # before the stream is opened
        next(stream.predict_stream(model_dir, str(tmp_path / "none.mp4"), top=top))


def _window_logits(model_dir, frames, end, size, settings):
    """Reference logits of the window of `size` frames ending at frame `end` (inclusive)."""
    from aia_jax.data import transforms

    window = frames[max(0, end + 1 - size) : end + 1]
    indices = predict.frame_indices(len(window), T, settings)
    geometry = transforms.Geometry(resize=(36, 44), crop_size=S, test_crops=1)
    clip = transforms.eval_clips(window[indices][None], geometry)
    return reference_logits(model_dir, clip)[0]


def test_stream_slides_a_window_over_the_stream(model_dir, tmp_path, capsys):
    from aia_jax import stream
    from aia_jax.data import decode

    video = str(tmp_path / "stream.mp4")
    testing.write_video(video, num_frames=40, video=5, size=(36, 44), fps=10)
    frames = decode.read_video(video, np.arange)
    settings = predict.preprocessing_settings(model_dir, resize=(36, 44), crop_size=S)
    kwargs = dict(resize=(36, 44), crop_size=S)

    # A file: every window, from the first full one (1.2 s at 10 fps = 12 frames), 5 apart.
    results = list(stream.predict_stream(model_dir, video, window_seconds=1.2, every=5, **kwargs))
    assert [r["frame"] for r in results] == [11, 16, 21, 26, 31, 36]
    assert {r["window"] for r in results} == {12} and results[0]["fps"] == 10.0
    assert results[0]["time"] == pytest.approx(1.1)
    for r in results:
        expected = _window_logits(model_dir, frames, r["frame"], 12, settings)
        np.testing.assert_allclose(r["logits"], expected, rtol=1e-5, atol=1e-5)
        assert r["top"][0]["name"] == NAMES[int(np.argmax(expected))]

    # Read as a live stream: the newest windows, whichever the network keeps up with.
    live = list(
        stream.predict_stream(
            model_dir, video, window_seconds=1.2, every=5, realtime=True, **kwargs
        )
    )
    assert live and all(r["frame"] >= 11 for r in live)
    assert [r["frame"] for r in live] == sorted({r["frame"] for r in live})
    for r in live:
        expected = _window_logits(model_dir, frames, r["frame"], 12, settings)
        np.testing.assert_allclose(r["logits"], expected, rtol=1e-5, atol=1e-5)

    # A stream shorter than its window is predicted once, over all it gave.
    (short,) = stream.predict_stream(model_dir, video, window_seconds=10.0, **kwargs)
    assert short["frame"] == 39 and short["window"] == 40
    expected = _window_logits(model_dir, frames, 39, 40, settings)
    np.testing.assert_allclose(short["logits"], expected, rtol=1e-5, atol=1e-5)

    # The command: one line per prediction, or JSON lines.
    argv = ["--checkpoint", model_dir, "--resize", "36,44", "--crop-size", str(S), "--stream"]
    predict.main([*argv, "--window-seconds", "1.2", "--every", "10", "--top", "2", video])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("frame 11 (1.10 s): ")
    predict.main([*argv, "--window-seconds", "1.2", "--every", "10", "--json", video])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [row["frame"] for row in rows] == [11, 21, 31]
    assert all(len(row["top"]) == CLASSES for row in rows)  # --top 5, capped


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--every", "3"], "need --stream"),
        # Flagged even when the value is the default's: the flag itself is the mistake.
        (["--window-seconds", "2"], "need --stream"),
        (["--window-seconds", "2.0"], "need --stream"),
        (["--input-option", "framerate=30"], "need --stream"),
        (["--input-format", "v4l2"], "need --stream"),
        (["--no-realtime"], "need --stream"),
        (["--stream", "--window-seconds", "0"], "'0': expected a positive number"),
        (["--stream", "--input-option", "framerate"], "expected KEY=VALUE"),
        (["--stream", "--filename-template", "img_{:05d}.jpg"], "reads frame folders"),
    ],
)
def test_stream_flags_are_checked(model_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", model_dir, *extra, str(tmp_path / "v.mp4")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_stream_that_cannot_be_opened_is_one_line(model_dir, tmp_path, capsys):
    missing = str(tmp_path / "no-camera")
    with pytest.raises(SystemExit) as e:
        predict.main(["--checkpoint", model_dir, "--stream", missing])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{missing}: cannot open the stream" in err


def test_stream_from_a_live_source_stops_with_its_consumer(model_dir):
    """FFmpeg's test source stands in for a camera: endless, opened by input format."""
    import itertools
    import threading
    import time

    from aia_jax import stream

    source = "testsrc=size=44x36:rate=10"
    results = stream.predict_stream(
        model_dir, source, input_format="lavfi", window_seconds=0.8, resize=(36, 44), crop_size=S
    )
    taken = list(itertools.islice(results, 3))
    results.close()  # what a Ctrl-C in the command does
    assert [r["window"] for r in taken] == [8, 8, 8] and taken[0]["fps"] == 10.0
    assert taken[0]["frame"] >= 7 and taken[1]["frame"] >= taken[0]["frame"] + 2
    deadline = time.monotonic() + 10
    while any(t.name == "aia-stream-reader" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reader thread outlived its consumer"
        time.sleep(0.05)


def _video_without_frames(path):
    """A container whose video stream has no packets (only its audio stream has some)."""
    import av

    with av.open(path, "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.height, video.width, video.pix_fmt = 36, 44, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), "s16", "mono")
        frame.sample_rate = 8000
        for packet in [*audio.encode(frame), *audio.encode(None)]:
            container.mux(packet)


@pytest.mark.parametrize("realtime", [False, True])
def test_stream_without_frames_is_one_error(model_dir, tmp_path, capsys, realtime):
    """Nothing printed and exit status 0 would read as a stream no class fits."""
    from aia_jax import stream

    video = str(tmp_path / "no_frames.mkv")
    _video_without_frames(video)
    results = stream.predict_stream(
        model_dir, video, realtime=realtime, resize=(36, 44), crop_size=S
    )
    with pytest.raises(export.UserError, match="ended before its first video frame"):
        list(results)
    argv = ["--checkpoint", model_dir, "--resize", "36,44", "--crop-size", str(S), "--stream"]
    line = _fails(predict.main, [*argv, video], capsys)
    assert f"{video}: the stream ended before its first video frame" in line


def test_stream_window_holds_the_whole_dense_clip(model_dir, tmp_path):
    """A dense3d clip of 4 frames 4 apart spans 13 frames: a 0.8 s window at 10 fps (8 frames)
    would loop it back onto its first frames ([0, 4, 0, 4]); the window is widened instead."""
    import shutil

    from aia_jax import stream
    from aia_jax.data import decode, transforms

    workdir = str(tmp_path / "dense")
    shutil.copytree(model_dir, workdir)
    config = {"sampling": "dense3d", "frame_interval": 4, "resize": [36, 44], "crop_size": S}
    with open(os.path.join(workdir, predict.CONFIG_FILE), "w") as f:
        json.dump({"data": config}, f)
    video = str(tmp_path / "stream.mp4")
    testing.write_video(video, num_frames=30, video=5, size=(36, 44), fps=10)
    frames = decode.read_video(video, np.arange)

    results = list(stream.predict_stream(workdir, video, window_seconds=0.8, every=6))
    assert [r["frame"] for r in results] == [12, 18, 24] and {r["window"] for r in results} == {13}
    geometry = transforms.Geometry(resize=(36, 44), crop_size=S, test_crops=1)
    for r in results:
        clip = frames[r["frame"] - 12 : r["frame"] + 1 : 4]  # 4 frames 4 apart, in order
        expected = reference_logits(model_dir, transforms.eval_clips(clip[None], geometry))[0]
        np.testing.assert_allclose(r["logits"], expected, rtol=1e-5, atol=1e-5)


def test_predict_on_a_device_or_url_points_to_stream(model_dir, tmp_path, capsys):
    """/dev/video0 exists and a URL is no path: neither is 'no such video file'."""
    device = str(tmp_path / "video0")
    os.mkfifo(device)  # exists, neither a file nor a folder, like a camera's device node
    argv = ["--checkpoint", model_dir]
    for source in (device, "rtsp://camera.local/stream"):
        line = _fails(predict.main, [*argv, source], capsys)
        assert f"{source}: not a video file or frame folder" in line and "--stream" in line
    missing = str(tmp_path / "missing.mp4")
    assert _fails(predict.main, [*argv, missing], capsys).endswith(
        f"{missing}: no such video file or frame folder"
    )


def test_printed_prediction_names_the_clip_it_sampled():
    """A dense3d workdir's clip is not segment centres; the printed line says which it was."""
    top = [{"class": 0, "name": "waving", "probability": 1.0, "logit": 0.0}]
    settings = {**predict.DEFAULTS, "crop_size": S}
    result = {"video": "v.mp4", "num_segments": T, "settings": settings, "top": top}
    assert "v.mp4: 4 frames (segment centres), centre crop 32x32" in predict.format_prediction(
        result
    )
    dense = {**result, "settings": {**settings, "sampling": "dense3d", "frame_interval": 8}}
    assert "v.mp4: 4 frames 8 apart, centre crop 32x32" in predict.format_prediction(dense)


class _FakeContainer:
    """A container whose video stream says `rate` fps and holds `frames` grey frames."""

    def __init__(self, rate, frames: int = 0):
        import types

        video = types.SimpleNamespace(average_rate=rate, guessed_rate=None, base_rate=None)
        self.streams = types.SimpleNamespace(video=[video])
        self._frames = frames

    def decode(self, video: int):
        import types

        for i in range(self._frames):
            image = np.full((36, 44, 3), 4 * i, np.uint8)
            yield types.SimpleNamespace(time=i / 25, to_ndarray=lambda format, x=image: x)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "rate, expected",
    [
        (Fraction(30000, 1001), 30000 / 1001),
        (Fraction(90000), None),
        (1e6, None),
        (Fraction(1, 1000), None),
        (0, None),
        (None, None),
        (Fraction(1000), 1000.0),
    ],
)
def test_stream_frame_rate_outside_the_plausible_is_not_trusted(rate, expected, caplog):
    """A live stream's time base or a broken header (90000 or 1e6 fps, 0.001) would make the
    window millions of frames (memory) or just the clip: warned, and the default taken."""
    from aia_jax import stream

    with caplog.at_level("WARNING"):
        assert stream.frame_rate(_FakeContainer(rate), "rtsp://camera") == expected
    warned = [r.getMessage() for r in caplog.records]
    if expected is None and rate:
        (message,) = warned
        assert message.startswith(f"rtsp://camera: the stream says {float(rate):g} frames per")
        assert "taking 25" in message
    else:
        assert warned == []


def test_stream_with_an_implausible_frame_rate_keeps_a_default_window(model_dir, monkeypatch):
    from aia_jax import stream

    monkeypatch.setattr(stream, "open_source", lambda *a, **k: _FakeContainer(Fraction(90000), 60))
    results = list(
        stream.predict_stream(model_dir, "x.ts", window_seconds=2.0, resize=(36, 44), crop_size=S)
    )
    # 2 s at 25 fps: 50 frames, a prediction every 12; not 180000 frames, never full.
    assert [r["frame"] for r in results] == [49]
    assert {(r["window"], r["fps"]) for r in results} == {(50, 25.0)}
