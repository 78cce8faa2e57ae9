"""End to end on small JPEG folders, video files and TFDS datasets; bad input of every kind."""

import os
import shutil
import sys

import numpy as np
import pytest

import aia_jax.data as data
from aia_jax.data import decode, sources, testing
from aia_jax.data.testing import frame_ids, video_ids


def small_config(root, source="frames", **overrides):
    c = data.get_config()
    c.source = source
    c.root = str(root)
    c.media_dir = {"frames": "frames", "videos": "videos"}.get(source, "")
    c.train_list = c.val_list = "train.txt"
    c.filename_template = "img_{:05d}.jpg"
    c.num_classes = 4
    c.num_segments = 4
    c.resize = (24, 32)
    c.crop_size = 16
    c.num_workers = 0
    for k, v in overrides.items():
        c[k] = v
    return c


def one_train_batch(c, batch=4):
    it = data.make_train_iterator(
        c, global_batch_size=batch, seed=0, process_index=0, process_count=1
    )
    return next(it)


def all_eval(c, batch=4, split="val"):
    batches = list(
        data.make_eval_iterator(
            c, split=split, global_batch_size=batch, process_index=0, process_count=1
        )
    )
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------
# Frame folders.


def test_frame_folders_train_and_eval(tmp_path):
    testing.write_frame_folders(str(tmp_path), 6, [12, 12, 3, 12, 20, 12])
    c = small_config(tmp_path)
    batch = one_train_batch(c)
    assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["video"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    # Train frames lie one per segment (segments of 3 frames for a 12-frame video).
    for clip in batch["video"]:
        ids = frame_ids(clip)
        assert np.all(np.diff(ids) >= 0)
    out = all_eval(c, batch=4)
    assert out["video"].shape == (8, 1, 4, 16, 16, 3)
    assert out["valid"].tolist() == [True] * 6 + [False] * 2
    assert out["index"].tolist()[:6] == list(range(6))
    np.testing.assert_array_equal(out["label"][:6], [0, 1, 2, 3, 0, 1])
    # Segment centres of 12 frames: 1, 4, 7, 10; the 3-frame video (≤ T) takes frame 0.
    np.testing.assert_array_equal(frame_ids(out["video"][0, 0]), [1, 4, 7, 10])
    np.testing.assert_array_equal(frame_ids(out["video"][2, 0]), [0, 0, 0, 0])
    np.testing.assert_array_equal(frame_ids(out["video"][4, 0]), [2, 7, 12, 17])


def test_frame_folders_test_protocols(tmp_path):
    testing.write_frame_folders(str(tmp_path), 2, 12)
    c = small_config(tmp_path, test_clips="twice", test_crops=3)
    out = all_eval(c, batch=2)
    assert out["video"].shape == (2, 6, 4, 24, 24, 3)  # 2 clips x 3 full-res crops of 24
    np.testing.assert_array_equal(frame_ids(out["video"][0, 0]), [1, 4, 7, 10])  # centres
    np.testing.assert_array_equal(frame_ids(out["video"][0, 3]), [0, 3, 6, 9])  # starts
    c = small_config(tmp_path, test_clips="dense", test_crops=10)
    assert all_eval(c, batch=2)["video"].shape == (2, 100, 4, 16, 16, 3)
    assert data.eval_view_shape(c) == (100, 4, 16, 16, 3)
    views = data.eval_views(c)
    assert len(views) == 100 and views[1] == (0, 1, True) and views[10] == (1, 0, False)


def test_presets_fill_unset_fields_and_class_names(tmp_path):
    c = data.get_config()
    c.source, c.preset = "frames", "something_v1"
    r = data.resolve(c)
    assert r.num_classes == 174 and r.filename_template == "{:05d}.jpg"
    assert r.media_dir == "20bn-something-something-v1" and r.train_list == "train_videofolder.txt"
    lut = data.config.flip_lookup(r)
    assert (lut[86], lut[87], lut[93], lut[94], lut[166], lut[167]) == (87, 86, 94, 93, 167, 166)
    assert data.class_names(c)[:2] == ["0", "1"]
    c.preset = "something_v2"
    assert data.resolve(c).filename_template == "{:06d}.jpg"
    c.preset = "ucf101"
    names = data.class_names(c)
    assert len(names) == 101 and names[0] == "ApplyEyeMakeup" and names[-1] == "YoYo"
    c.preset = "hmdb51_split3"
    assert len(data.class_names(c)) == 51 and data.resolve(c).val_list.endswith("split_3.txt")
    c.preset = "egtea_split2"
    assert data.num_classes(c) == 106 and data.resolve(c).train_list == "train_split2.txt"
    for preset, n in (("diving48", 48), ("kinetics400", 400)):
        c.preset = preset
        assert data.num_classes(c) == n
    c.preset = "diving48"
    c.num_classes = 0  # a user value wins; 0 means "take the preset's"
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(f"dive {i}" for i in range(48)) + "\n")
    c.classnames = str(names_file)
    assert data.class_names(c)[47] == "dive 47"
    names_file.write_text("a\nb\n")
    with pytest.raises(data.DataError, match="2 class names for 48 classes"):
        data.class_names(c)
    c.preset = "nope"
    with pytest.raises(data.DataError, match="unknown preset 'nope'"):
        data.resolve(c)


def test_preset_gives_its_source_unless_one_is_chosen(tmp_path):
    c = data.get_config()  # source 'synthetic', the default
    c.preset = "something_v1"
    assert data.resolve(c).source == "frames"
    c.root = str(tmp_path / "absent")  # checked as a frames root, not skipped as synthetic
    with pytest.raises(data.DataError, match="config.data.root .*absent: not a directory"):
        data.resolve(c)
    c.root, c.source = "", "videos"
    assert data.resolve(c).source == "videos"
    c.source, c.preset = "synthetic", "synthetic"
    assert data.resolve(c).source == "synthetic"


# ---------------------------------------------------------------------------------------------
# Bad input found at start: a one-line DataError naming the file and line.


@pytest.mark.parametrize(
    "field, message",
    [
        (
            "test_crop",
            r"config.data.test_crop: no such field \(did you mean config.data.test_crops",
        ),
        ("frist_frame", r"config.data.frist_frame: no such field \(did you mean .*first_frame\?\)"),
        ("flipmap", r"config.data.flipmap: no such field \(did you mean config.data.flip_map\?"),
        ("zzz", r"^config.data.zzz: no such field$"),
    ],
)
def test_misspelt_config_fields_fail_at_start(tmp_path, field, message):
    c = small_config(tmp_path)
    c[field] = 0  # a config file's typo; the command line's are ml_collections' errors
    with pytest.raises(data.DataError, match=message):
        data.resolve(c)


@pytest.mark.parametrize(
    "line, message",
    [
        ("vid000 12", "train.txt:2: expected 'relative/dir num_frames label', got 'vid000 12'"),
        ("vid000 twelve 1", "train.txt:2: expected 'relative/dir num_frames label'"),
        ("vid000 0 1", "train.txt:2: num_frames must be positive, got 0"),
        ("vid000 12 4", r"train.txt:2: label 4 is outside \[0, 4\)"),
        ("vid000 12 -1", r"train.txt:2: label -1 is outside \[0, 4\)"),
        ("nowhere 12 1", "train.txt:2: frame folder .*nowhere not found"),
        ("vid000 12 0 1", r"got 0 \(read as dir 'vid000 12', num_frames 0, label 1: the last"),
        ("vid\xe9 12 1", r"train.txt:2: not UTF-8 text \(invalid continuation byte at byte 3\)"),
    ],
)
def test_bad_frame_lists_fail_at_start(tmp_path, line, message):
    testing.write_frame_folders(str(tmp_path), 1, 12)
    with open(tmp_path / "train.txt", "ab") as f:
        f.write(line.encode("latin-1") + b"\n")
    c = small_config(tmp_path)
    with pytest.raises(data.DataError, match=message) as e:
        data.make_train_iterator(c, global_batch_size=1, seed=0, process_index=0, process_count=1)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("resize", (48,), r"config.data.resize \(48,\): expected \(height, width\)"),
        ("scales", (), r"config.data.scales \(\): expected fractions in \(0, 1\]"),
        ("filename_template", "{}{}", r"filename_template '\{\}\{\}': expected one field"),
        ("filename_template", "img.jpg", r"config.data.filename_template 'img.jpg': expected one"),
        ("frame_interval", 0, r"config.data.frame_interval 0: expected an int >= 1"),
        ("num_workers", -1, r"config.data.num_workers -1: expected an int >= 0"),
    ],
)
def test_bad_config_values_fail_at_start(tmp_path, field, value, message):
    testing.write_frame_folders(str(tmp_path), 2, 12)
    c = small_config(tmp_path)
    c[field] = value
    with pytest.raises(data.DataError, match=message):
        data.make_train_iterator(c, global_batch_size=1, seed=0, process_index=0, process_count=1)


def test_empty_or_missing_list_and_missing_root(tmp_path):
    (tmp_path / "train.txt").write_text("\n\n")
    c = small_config(tmp_path)
    with pytest.raises(data.DataError, match="train.txt: the list is empty"):
        data.num_eval_examples(c)
    c.val_list = "other.txt"
    with pytest.raises(data.DataError, match="other.txt: list file not found"):
        data.num_eval_examples(c)
    c.root = str(tmp_path / "absent")
    with pytest.raises(data.DataError, match="config.data.root .*absent: not a directory"):
        data.num_eval_examples(c)
    c = small_config(tmp_path, on_bad_sample="ignore")
    with pytest.raises(data.DataError, match="config.data.on_bad_sample 'ignore'"):
        data.resolve(c)


def test_too_few_videos_for_the_batch(tmp_path):
    testing.write_frame_folders(str(tmp_path), 3, 12)
    with pytest.raises(
        data.DataError, match="3 training videos are fewer than global_batch_size 4"
    ):
        one_train_batch(small_config(tmp_path), batch=4)
    with pytest.raises(data.DataError, match="multiple of process_count 2"):
        data.make_train_iterator(
            small_config(tmp_path), global_batch_size=3, seed=0, process_index=0, process_count=2
        )


def test_list_and_class_name_files_with_a_byte_order_mark(tmp_path):
    # Windows editors save UTF-8 with a BOM (and CRLF); it is no part of the first path or name.
    testing.write_frame_folders(str(tmp_path), 2, 12)
    lines = (tmp_path / "train.txt").read_bytes().replace(b"\n", b"\r\n")
    (tmp_path / "train.txt").write_bytes(b"\xef\xbb\xbf" + lines)
    names = tmp_path / "names.txt"
    names.write_bytes("\ufeffa\r\nb\r\nc\r\nd\r\n".encode())
    c = small_config(tmp_path, classnames=str(names))
    assert all_eval(c, batch=2)["valid"].tolist() == [True, True]
    assert data.class_names(c) == ["a", "b", "c", "d"]
    testing.write_video_files(str(tmp_path / "v"), 1, 10)
    (tmp_path / "v" / "train.txt").write_bytes(b"\xef\xbb\xbfv000.mp4 1\r\n")
    entries = sources.parse_video_list(
        str(tmp_path / "v" / "train.txt"), str(tmp_path / "v/videos"), 4
    )
    assert entries[0].path == "v000.mp4"


def test_frames_of_different_sizes_in_one_clip(tmp_path):
    from PIL import Image

    testing.write_frame_folders(str(tmp_path), 2, 12)
    frame = tmp_path / "frames" / "vid001" / "img_00005.jpg"  # a segment centre (index 4)
    Image.open(frame).resize((40, 30)).save(frame)
    out = all_eval(small_config(tmp_path), batch=2)
    assert out["valid"].tolist() == [True, True]
    np.testing.assert_array_equal(frame_ids(out["video"][1, 0]), [1, 4, 7, 10])
    np.testing.assert_array_equal(video_ids(out["video"][1, 0]), [1, 1, 1, 1])


def _broken_png(path):
    """A PNG whose IDAT length is wrong: PIL raises SyntaxError ("broken PNG file") on load."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")  # an IDAT long enough to cut short
    data_ = bytearray(buffer.getvalue())
    data_[33 + 3] ^= 0x40  # IDAT follows the 8-byte signature and the 25-byte IHDR chunk
    path.write_bytes(bytes(data_))
    return bytes(data_)


def test_damaged_png_frames_are_bad_samples(tmp_path):
    testing.write_frame_folders(str(tmp_path), 3, 12, template="img_{:05d}.png")
    for f in range(1, 13):
        broken = _broken_png(tmp_path / "frames" / "vid001" / f"img_{f:05d}.png")
    c = small_config(tmp_path, filename_template="img_{:05d}.png")
    with pytest.raises(
        data.BadSampleError, match=r"train.txt:2 \(vid001\): cannot decode .*broken"
    ):
        all_eval(c, batch=3)
    c.on_bad_sample = "skip"
    assert all_eval(c, batch=3)["valid"].tolist() == [True, False, True]
    with pytest.raises(data.BadSampleError, match="^cannot decode frame 7: broken PNG"):
        sources._decode_image_bytes(broken, 7)


# ---------------------------------------------------------------------------------------------
# Bad samples mid-epoch: `raise` by default, or `skip` with a warning and a counter.


def _break_frames(tmp_path):
    testing.write_frame_folders(str(tmp_path), 8, 12)
    for f in range(1, 13):  # missing frames (whatever is sampled)
        os.remove(tmp_path / "frames" / "vid001" / f"img_{f:05d}.jpg")
    for f in range(1, 13):  # undecodable frames
        (tmp_path / "frames" / "vid002" / f"img_{f:05d}.jpg").write_bytes(b"not a jpeg")


def test_frames_numbered_from_zero(tmp_path):
    testing.write_frame_folders(str(tmp_path), 6, 12, first_frame=0)
    c = small_config(tmp_path)
    with pytest.raises(
        data.DataError,
        match=r"train.txt:1: frame folder .*vid000 has no img_00012.jpg \(frame 12 of 12.*"
        r"nor have the next 3 folders checked\); img_00000.jpg is there: .*first_frame=0",
    ):
        all_eval(c)
    c.first_frame = 0
    out = all_eval(c, batch=6)
    np.testing.assert_array_equal(frame_ids(out["video"][:, 0]), [[1, 4, 7, 10]] * 6)
    c.first_frame = 2
    with pytest.raises(data.DataError, match=r"config.data.first_frame 2: expected 0 or 1"):
        all_eval(c)
    testing.write_frame_folders(str(tmp_path / "one"), 6, 12)
    c = small_config(tmp_path / "one", first_frame=0)
    with pytest.raises(data.DataError, match=r"no img_00000.jpg.*set config.data.first_frame=1"):
        all_eval(c)


def test_bad_frames_raise_naming_list_line_and_file(tmp_path):
    _break_frames(tmp_path)
    c = small_config(tmp_path, val_list="train.txt")
    with pytest.raises(
        data.BadSampleError, match=r"train.txt:2 \(vid001\): missing frame .*img_00002.jpg"
    ):
        all_eval(c, batch=8)
    c.val_list = "val.txt"
    (tmp_path / "val.txt").write_text("vid002 12 2\n")
    with pytest.raises(
        data.BadSampleError, match=r"val.txt:1 \(vid002\): cannot decode .*img_00002.jpg"
    ):
        all_eval(c, batch=1)


def test_bad_frames_skip_and_count(tmp_path):
    _break_frames(tmp_path)
    c = small_config(tmp_path, on_bad_sample="skip")
    data.reset_bad_sample_count()
    out = all_eval(c, batch=8)
    assert data.bad_sample_count() == 2
    assert out["valid"].tolist() == [True, False, False] + [True] * 5
    assert out["index"].tolist() == list(range(8))  # the bad rows still say which video
    assert any("img_00002.jpg" in m for m in data.bad_samples())
    data.reset_bad_sample_count()
    it = data.make_train_iterator(c, global_batch_size=2, seed=0, process_index=0, process_count=1)
    for _ in range(9):  # 18 good videos: more than two epochs of 6, 2 bad videos in each
        next(it)
    assert data.bad_sample_count() >= 4
    seen = set()  # videos 1 and 2 never appear
    for _ in range(6):
        seen |= set(video_ids(next(it)["video"]).ravel().tolist())
    assert seen == {0, 3, 4, 5, 6, 7}


def test_skipping_stops_when_nothing_can_be_read(tmp_path):
    testing.write_frame_folders(str(tmp_path), 8, 12)
    for path in (tmp_path / "frames").glob("*/*.jpg"):
        path.write_bytes(b"not a jpeg")
    c = small_config(tmp_path, on_bad_sample="skip")
    it = data.make_train_iterator(c, global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(data.DataError, match=r"64 training samples in a row could not be read"):
        next(it)


# ---------------------------------------------------------------------------------------------
# Video files.


@pytest.mark.parametrize("ext", ["mp4", "webm", "avi"])
def test_read_video_picks_exact_frames(tmp_path, ext):
    import av

    path = str(tmp_path / f"v.{ext}")
    testing.write_video(path, 40, gop=8)
    wanted = np.array([[0, 5, 39], [21, 21, 3]])
    frames = decode.read_video(path, lambda n: wanted if n == 40 else None)
    assert frames.shape == (2, 3, 24, 32, 3)
    if ext != "avi":  # mpeg4 shifts flat colours by a few levels
        np.testing.assert_array_equal(frame_ids(frames), wanted % 32)
    with av.open(path) as container:  # the same pixels as decoding every frame in order
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.testing.assert_array_equal(frames, np.stack(every)[wanted])


def test_read_video_seeks_instead_of_decoding_everything(tmp_path):
    path = str(tmp_path / "long.mp4")
    testing.write_video(path, 300, gop=10, size=(16, 16))
    before = decode.decoded_frames
    frames = decode.read_video(path, lambda n: np.array([290, 295]))
    np.testing.assert_array_equal(frame_ids(frames), [290 % 32, 295 % 32])
    assert decode.decoded_frames - before < 40  # from the keyframe at 290, not from 0


@pytest.mark.parametrize("seek", ["works", "raises", "stays"])
def test_read_video_scans_and_decodes_in_one_open(tmp_path, monkeypatch, seek):
    # A frame-count cache miss decodes from the container it scanned, which the scan left at its
    # end; where seeking back fails or does not move, it counts frames from a fresh open instead.
    import av

    path = str(tmp_path / "v.mp4")
    testing.write_video(path, 40, gop=8)
    with av.open(path) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    opened, real_open = [], av.open

    class Container:
        def __init__(self, *args):
            opened.append(args[0])
            self._container = real_open(*args)

        def __getattr__(self, name):
            return getattr(self._container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self._container.close()

        def seek(self, *args, **kwargs):
            if seek == "raises":
                raise av.error.InvalidDataError(-1094995529, "Invalid data found")
            if seek == "works":
                self._container.seek(*args, **kwargs)

    monkeypatch.setattr(av, "open", Container)
    wanted = np.array([0, 3, 39])  # 39 is far enough for a seek on a cache hit too
    decode._frame_times.cache_clear()
    np.testing.assert_array_equal(decode.read_video(path, lambda n: wanted), every[wanted])
    assert len(opened) == (1 if seek == "works" else 2), opened
    np.testing.assert_array_equal(decode.read_video(path, lambda n: wanted), every[wanted])


def _write_vfr_video(path, pts, size=(24, 32)):
    """A video whose frame f is shown from `pts[f]` hundredths of a second (frame_pixels)."""
    import fractions

    import av

    ext = os.path.splitext(path)[1]
    with av.open(path, "w") as container:
        stream = container.add_stream({".webm": "libvpx-vp9"}.get(ext, "libx264"), rate=25)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.gop_size = 8
        stream.codec_context.time_base = fractions.Fraction(1, 100)
        for f, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(testing.frame_pixels(0, f, size), format="rgb24")
            frame.pts, frame.time_base = t, fractions.Fraction(1, 100)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_read_video_variable_frame_rate(tmp_path, ext):
    # 25 fps for 30 frames, then 50 fps: frame indices from the nominal rate ran out before the
    # last frames ("stream ended before frame …") or repeated the frame at the switch.
    path = str(tmp_path / f"vfr.{ext}")
    pts = [4 * i for i in range(30)] + [120 + 2 * i for i in range(30)]
    _write_vfr_video(path, pts)
    wanted = np.arange(60)
    frames = decode.read_video(path, lambda n: wanted)
    np.testing.assert_array_equal(frame_ids(frames), wanted % 32)
    # Alone, through a seek: the same pixels.
    for i in (35, 59):
        got = decode.read_video(path, lambda n, i=i: np.array([i]) if n == 60 else None)
        np.testing.assert_array_equal(got, frames[i : i + 1])


def test_video_list_end_to_end(tmp_path):
    testing.write_video_files(str(tmp_path), 5, [16, 16, 5, 16, 30])
    c = small_config(tmp_path, "videos")
    assert one_train_batch(c)["video"].shape == (4, 4, 16, 16, 3)
    out = all_eval(c, batch=2)
    assert out["valid"].tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(frame_ids(out["video"][0, 0]), [2, 6, 10, 14])
    np.testing.assert_array_equal(frame_ids(out["video"][4, 0]), [3, 11, 18, 26])


def test_video_class_folders(tmp_path):
    folder = testing.write_video_files(str(tmp_path), 6, 8, num_classes=3, class_folders=True)
    c = small_config(tmp_path, "videos", num_classes=0, train_list=folder, val_list=folder)
    assert data.num_classes(c) == 3
    assert data.class_names(c) == ["class0", "class1", "class2"]
    out = all_eval(c, batch=6)
    assert sorted(out["label"].tolist()) == [0, 0, 1, 1, 2, 2]


def test_hidden_folders_are_not_classes(tmp_path):
    folder = testing.write_video_files(str(tmp_path), 4, 8, num_classes=2, class_folders=True)
    for hidden in (".ipynb_checkpoints", "@eaDir"):
        shutil.copytree(os.path.join(folder, "class0"), os.path.join(folder, hidden))
    c = small_config(tmp_path, "videos", num_classes=0, train_list=folder, val_list=folder)
    assert data.num_classes(c) == 2 and data.class_names(c) == ["class0", "class1"]
    out = all_eval(c, batch=4)
    assert sorted(out["label"].tolist()) == [0, 0, 1, 1]


def test_val_class_folders_take_the_training_labels(tmp_path):
    train = testing.write_video_files(
        str(tmp_path), 6, 8, num_classes=3, class_folders=True, media_dir="train"
    )
    val = testing.write_video_files(
        str(tmp_path), 6, 8, num_classes=3, class_folders=True, media_dir="val"
    )
    shutil.rmtree(os.path.join(val, "class1"))
    c = small_config(tmp_path, "videos", num_classes=0, train_list=train, val_list=val)
    out = all_eval(c, batch=4)
    assert sorted(out["label"][out["valid"]].tolist()) == [0, 0, 2, 2]
    os.rename(os.path.join(val, "class2"), os.path.join(val, "class9"))
    with pytest.raises(data.DataError, match=r"val/class9: class folder not among the training"):
        all_eval(c, batch=4)


def test_bad_videos(tmp_path):
    testing.write_video_files(str(tmp_path), 4, 10)
    (tmp_path / "videos" / "v001.mp4").write_bytes(b"\x00" * 1000)
    c = small_config(tmp_path, "videos")
    with pytest.raises(data.BadSampleError, match=r"train.txt:2 \(v001.mp4\): cannot decode"):
        all_eval(c)
    c.on_bad_sample = "skip"
    data.reset_bad_sample_count()
    assert all_eval(c)["valid"].tolist() == [True, False, True, True]
    assert data.bad_sample_count() == 1
    with open(tmp_path / "train.txt", "a") as f:
        f.write("v009.mp4 1\n")
    with pytest.raises(data.DataError, match=r"train.txt:5: video .*v009.mp4 not found"):
        all_eval(c)
    (tmp_path / "train.txt").write_text("v000.mp4\n")
    with pytest.raises(data.DataError, match=r"train.txt:1: expected 'relative/file label'"):
        all_eval(c)


# ---------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_end_to_end_without_tensorflow(tmp_path):
    testing.write_tfds(str(tmp_path), "tiny_clips", {"train": 6, "test": 3}, num_frames=12)
    c = small_config(
        tmp_path, "tfds", tfds_name="tiny_clips", data_dir=str(tmp_path), num_classes=0
    )
    c.val_split = "test"
    assert data.num_classes(c) == 4 and data.class_names(c) == ["0", "1", "2", "3"]
    assert one_train_batch(c)["video"].shape == (4, 4, 16, 16, 3)
    out = all_eval(c, batch=2)
    assert out["valid"].tolist() == [True] * 3 + [False]
    for row in range(3):  # centre frames of 12 in 4 segments
        np.testing.assert_array_equal(frame_ids(out["video"][row, 0]), [1, 4, 7, 10])
    assert "tensorflow" not in sys.modules
    c.val_split = "nosuch"
    with pytest.raises(data.DataError, match="tiny_clips"):
        all_eval(c)


def test_tfds_video_feature_read_raw_without_tensorflow(tmp_path):
    testing.write_raw_video_tfds(str(tmp_path), "raw_clips", "train", 5, corrupt=[3])
    c = small_config(tmp_path, "tfds", tfds_name="raw_clips", data_dir=str(tmp_path), num_classes=0)
    c.val_split = "train"
    assert data.num_classes(c) == 4
    with pytest.raises(data.BadSampleError) as e:
        all_eval(c, batch=5)
    # Named once, with the frame: the pipeline puts the example in front of the source's message.
    assert str(e.value).startswith("tfds raw_clips[train] example 3: cannot decode frame 1: ")
    c.on_bad_sample = "skip"
    out = all_eval(c, batch=5)
    assert out["valid"].tolist() == [True, True, True, False, True]
    np.testing.assert_array_equal(frame_ids(out["video"][0, 0]), [1, 4, 7, 10])
    assert "tensorflow" not in sys.modules


def test_tfds_video_without_frames_is_a_bad_sample(tmp_path):
    testing.write_raw_video_tfds(str(tmp_path), "empty_clips", "train", 2, num_frames=0)
    c = small_config(tmp_path, "tfds", tfds_name="empty_clips", data_dir=str(tmp_path))
    c.val_split = "train"
    with pytest.raises(
        data.BadSampleError, match=r"empty_clips\[train\] example 0: the video has no"
    ):
        all_eval(c, batch=2)
    c.on_bad_sample = "skip"
    assert all_eval(c, batch=2)["valid"].tolist() == [False, False]


def test_tfds_wrong_feature_keys_fail_at_start(tmp_path):
    testing.write_tfds(str(tmp_path), "tiny_clips", {"train": 2}, num_frames=4)
    testing.write_raw_video_tfds(str(tmp_path), "raw_clips", "train", 2)
    for name in ("tiny_clips", "raw_clips"):  # read by TFDS / by the raw ArrayRecord reader
        c = small_config(tmp_path, "tfds", tfds_name=name, data_dir=str(tmp_path), num_classes=4)
        c.tfds_label_key = "labels"
        with pytest.raises(data.DataError) as e:
            data.num_train_examples(c)
        assert str(e.value) == (
            f"config.data.tfds_label_key 'labels': tfds '{name}' has no such feature "
            "(it has label, video)"
        )
        c.tfds_label_key, c.tfds_video_key = "label", "frames"
        with pytest.raises(data.DataError, match=rf"tfds_video_key 'frames': tfds '{name}' has"):
            one_train_batch(c, batch=2)
    # Without features.json the raw reader takes the first record's features.
    os.remove(tmp_path / "raw_clips" / "1.0.0" / "features.json")
    raw = sources.RawArrayRecordExamples("raw_clips", "train", str(tmp_path))
    assert sorted(raw.feature_keys()) == ["label", "video"]


@pytest.mark.parametrize("channels", [1, 4])
def test_tfds_grey_and_rgba_tensor_videos_read_as_rgb(tmp_path, channels):
    from PIL import Image

    testing.write_tfds(str(tmp_path), "clips", {"train": 2}, 8, size=(8, 8), channels=channels)
    source = sources.TfdsSource("clips", "train", str(tmp_path))
    # The example of label 1 (TFDS orders examples by their keys' hashes).
    index = [int(source._open()[i]["label"]) for i in range(2)].index(1)
    raw = source._open()[index]["video"]
    frames, label = source.read(index, lambda n: np.array([[2, 0, 2]]))
    # What the release's PIL `convert('RGB')` makes of each frame: grey copied, alpha dropped.
    expected = [
        np.asarray(Image.fromarray(raw[i][..., 0] if channels == 1 else raw[i]).convert("RGB"))
        for i in (2, 0, 2)
    ]
    assert frames.dtype == np.uint8 and label == 1
    np.testing.assert_array_equal(frames, np.stack(expected)[None])
    # End to end, through resizing and cropping.
    c = small_config(tmp_path, "tfds", tfds_name="clips", data_dir=str(tmp_path))
    c.val_split = "train"
    assert one_train_batch(c, batch=2)["video"].shape == (2, 4, 16, 16, 3)
    out = all_eval(c, batch=2)
    assert out["video"].shape == (2, 1, 4, 16, 16, 3) and out["valid"].all()
    np.testing.assert_array_equal(frame_ids(out["video"][1, 0]), [1, 3, 5, 7])  # centres


def test_tfds_tensor_video_with_other_channels_is_a_bad_sample(tmp_path):
    testing.write_tfds(str(tmp_path), "two_channels", {"train": 2}, 8, size=(8, 8), channels=2)
    c = small_config(tmp_path, "tfds", tfds_name="two_channels", data_dir=str(tmp_path))
    c.val_split = "train"
    with pytest.raises(data.BadSampleError) as e:
        all_eval(c, batch=2)
    assert str(e.value) == (
        "tfds two_channels[train] example 0: feature 'video' has shape [8, 8, 8, 2] (uint8), "
        "expected [frames, height, width, channels] with 1 (grayscale), 3 (RGB) or 4 (RGBA) "
        "channels"
    )
    c.on_bad_sample = "skip"
    assert all_eval(c, batch=2)["valid"].tolist() == [False, False]


def write_sliceable_raw_tfds(root) -> None:
    """'train' videos 0–12 in shards of 5, 5, 3 and 'validation' videos 100–103 in shards of 2,
    2 (labels: the video numbers), with `Video` features: read by the raw ArrayRecord reader."""
    for split, n, shards, first in (("train", 13, [5, 5, 3], 0), ("validation", 4, [2, 2], 100)):
        testing.write_raw_video_tfds(
            str(root), "sliced", split, n, 4, size=(24, 32), num_classes=200,
            shard_lengths=shards, first=first,
        )  # fmt: skip


def test_tfds_sliced_splits_read_raw_as_tfds_slices(tmp_path):
    write_sliceable_raw_tfds(tmp_path)
    train, val = list(range(13)), [100, 101, 102, 103]
    # TFDS's semantics (tensorflow.org/datasets/splits): percents of a split rounded to the
    # closest example (Python's round: 50% of 13 is 6), negative bounds from the end, shards.
    expected = {
        "train": train,
        "train[:80%]": train[:10],
        "train[3:8]": train[3:8],  # across shard files
        "train[-10%:]": train[-1:],
        "train[-25%:-10%]": train[-3:-1],
        "train[:50%]+validation[:2]": train[:6] + val[:2],
        "validation + train[12:]": val + train[12:],
        "train[1shard:2shard]": train[5:10],
        "validation[1:3]": val[1:3],
        "all": train + val,
        "train[4:4]": [],
    }
    for spec, labels in expected.items():
        source = sources.TfdsSource("sliced", spec, str(tmp_path))
        assert source.raw and len(source) == len(labels), spec
        assert [int(source._open()[i]["label"]) for i in range(len(source))] == labels, spec
    # Through the pipeline: the frames are those of the picked videos.
    c = small_config(tmp_path, "tfds", tfds_name="sliced", data_dir=str(tmp_path), num_classes=0)
    c.train_split, c.val_split = "train[:80%]", "train[:50%]+validation[-1:]"
    assert set(one_train_batch(c, batch=4)["label"].tolist()) <= set(train[:10])
    out = all_eval(c, batch=8)
    assert out["label"][:7].tolist() == train[:6] + val[-1:]
    picked = np.stack([testing.frame_pixels(v, 0, (16, 16)) for v in train[:6] + val[-1:]])
    np.testing.assert_array_equal(video_ids(out["video"][:7, 0])[:, 0], video_ids(picked))
    assert "tensorflow" not in sys.modules


def test_tfds_bad_split_specs_are_one_line_errors(tmp_path):
    write_sliceable_raw_tfds(tmp_path)
    testing.write_tfds(str(tmp_path), "clips", {"train": 5, "validation": 2}, 2, size=(8, 8))
    for name, sizes in (("sliced", (13, 4)), ("clips", (5, 2))):  # raw reader / TFDS's
        for spec, reason in (
            ("train[::]", "Unrecognized split format: 'train[::]'"),
            ("train[1:2:3]", "Unrecognized split format: 'train[1:2:3]'"),
            ("nosuch[:10%]", "Unknown split 'nosuch'"),
            ("train+nosuch", "Unknown split 'nosuch'"),
            ("train[:200%]", "When unit=%, percent slice boundaries should be in [-100, 100]"),
            ("train[:20]", f"Requested slice [:20] incompatible with {sizes[0]} examples"),
            ("train[4:2]", "slice [4:2] of 'train' is reversed"),  # TFDS: a negative length
        ):
            with pytest.raises(data.DataError) as e:
                sources.TfdsSource(name, spec, str(tmp_path))
            assert str(e.value) == (
                f"{tmp_path / name / '1.0.0'}: split {spec!r}: {reason} (splits: train "
                f"({sizes[0]} examples), validation ({sizes[1]} examples); syntax as in TFDS, "
                "e.g. 'train', 'train[:80%]', 'train[10:20]+validation')"
            )


def test_tfds_sliced_splits_of_tensor_videos_read_as_the_raw_reader_maps_them(tmp_path):
    # Tensor videos go through `tfds.data_source`; the raw reader's mapping of a spec onto the
    # shard files must pick the same examples in the same order (it can read their labels).
    testing.write_tfds(
        str(tmp_path), "clips", {"train": 9, "validation": 3}, 4, size=(8, 8), num_classes=50
    )
    for spec in ("train[:50%]+validation[:2]", "train[-30%:-10%]", "validation+train[2:5]", "all"):
        source = sources.TfdsSource("clips", spec, str(tmp_path))
        raw = sources.RawArrayRecordExamples("clips", spec, str(tmp_path))
        labels = [int(source._open()[i]["label"]) for i in range(len(source))]
        assert not source.raw and len(raw) == len(source), spec
        assert [int(raw[i]["label"]) for i in range(len(raw))] == labels, spec
    c = small_config(tmp_path, "tfds", tfds_name="clips", data_dir=str(tmp_path), num_classes=0)
    c.val_split = "validation[1:]+train[:2]"
    train = sources.TfdsSource("clips", "train", str(tmp_path))
    val = sources.TfdsSource("clips", "validation", str(tmp_path))
    expected = [int(val._open()[i]["label"]) for i in (1, 2)]
    expected += [int(train._open()[i]["label"]) for i in (0, 1)]
    assert all_eval(c, batch=4)["label"].tolist() == expected


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_tfds_tensor_video_not_uint8_is_a_bad_sample(tmp_path, dtype):
    testing.write_tfds(str(tmp_path), "floats", {"train": 2}, 8, size=(8, 8), dtype=dtype)
    c = small_config(tmp_path, "tfds", tfds_name="floats", data_dir=str(tmp_path))
    c.val_split = "train"
    with pytest.raises(data.BadSampleError) as e:
        all_eval(c, batch=2)
    assert str(e.value) == (
        f"tfds floats[train] example 0: feature 'video' has shape [8, 8, 8, 3] "
        f"({np.dtype(dtype).name}), expected uint8 [frames, height, width, channels]"
    )
    c.on_bad_sample = "skip"
    assert all_eval(c, batch=2)["valid"].tolist() == [False, False]
