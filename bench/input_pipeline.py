"""Input pipeline throughput: clips/s of the train and eval pipelines, JPEG folders vs mp4.

Writes its own small data set under a temporary directory (textured 240x320 frames, as JPEG
folders and as H.264 mp4 files), then times 8-frame 224x224 clips through the real pipeline
(`make_train_iterator`: TSN sampling, multi-scale crop, flip; `make_eval_iterator`: centre
frames, centre crop) with 0, 1 and 2 worker processes, and prints a markdown table.

    python3 bench/input_pipeline.py                       # defaults below
    python3 bench/input_pipeline.py --workers 0,2,4 --batches 20 --videos 64

Worker start-up is excluded (the first batches are not timed). The numbers are for this machine and
its load at the time; the table says how many cores it has.

`--decode-baseline PATH` instead compares two versions of `aia_jax/data/decode.py` (the one at
PATH, e.g. from `git show REV:aia_jax/data/decode.py > /tmp/old.py`, and the current one): it
writes `--videos` mp4 (H.264) and webm (VP9) files of 240x320, 2-5 s at 25 or 30 fps with a
keyframe every 1 or 2 s, and times `read_video` on one 8-frame training sample (TSN) of each, in
this process, in `--rounds` rounds; the two modules take turns video by video (alternating which
goes first), so that changes in the machine's load hit both. Every read is a frame-count cache
miss (each module's caches are cleared at the start of each round and each video is read once
per round), as on data sets larger than the cache. Augmentation is not timed,
so the ratio is the most a whole pipeline can differ by.

    python3 bench/input_pipeline.py --decode-baseline /tmp/old.py --videos 48 --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aia_jax.data as data  # noqa: E402

HEIGHT, WIDTH = 240, 320
WARMUP = 3


def textured_frames(video: int, num_frames: int) -> np.ndarray:
    """Smooth random texture panning over time: JPEG/H.264 work like on real footage."""
    rng = np.random.default_rng(video)
    coarse = rng.integers(0, 256, size=(HEIGHT // 8 + 8, WIDTH // 8 + 8, 3), dtype=np.uint8)
    big = np.asarray(
        Image.fromarray(coarse).resize(((WIDTH // 8 + 8) * 8, (HEIGHT // 8 + 8) * 8), Image.BICUBIC)
    )
    return np.stack(
        [big[f % 64 : f % 64 + HEIGHT, f % 64 : f % 64 + WIDTH] for f in range(num_frames)]
    )


def write_data(root: str, videos: int, frames: int, entries: int) -> None:
    """`videos` distinct videos, listed round-robin `entries` times (so that eval runs long)."""
    import av

    lines_frames, lines_videos = [], []
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    for v in range(videos):
        clip = textured_frames(v, frames)
        folder = os.path.join(root, "frames", f"v{v:03d}")
        os.makedirs(folder, exist_ok=True)
        for f, frame in enumerate(clip):
            Image.fromarray(frame).save(os.path.join(folder, f"{f + 1:05d}.jpg"), quality=90)
        lines_frames.append(f"v{v:03d} {frames} {v % 10}")
        with av.open(os.path.join(root, "videos", f"v{v:03d}.mp4"), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
            for frame in clip:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        lines_videos.append(f"v{v:03d}.mp4 {v % 10}")
    for name, lines in (("frames.txt", lines_frames), ("videos.txt", lines_videos)):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lines[i % videos] for i in range(entries)) + "\n")


def write_videos(root: str, videos: int) -> list[str]:
    """Typical re-encoded data set files: 2-5 s at 25/30 fps, a keyframe every 1 or 2 s."""
    import av

    paths = []
    for v in range(videos):
        fps = 25 if v % 2 == 0 else 30
        clip = textured_frames(v, fps * (2 + v % 4))
        for ext, codec in (("mp4", "libx264"), ("webm", "libvpx-vp9")):
            path = os.path.join(root, f"d{v:03d}.{ext}")
            with av.open(path, "w") as container:
                options = {"deadline": "realtime", "cpu-used": "8"} if ext == "webm" else {}
                stream = container.add_stream(codec, rate=fps, options=options)
                stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
                stream.gop_size = fps * (1 + v // 2 % 2)
                for frame in clip:
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            paths.append(path)
    return paths


def compare_decode(baseline_path: str, videos: int, rounds: int) -> None:
    """Prints clips/s of `read_video` from the module at `baseline_path` vs the current one."""
    from aia_jax.data import decode, sampling

    spec = importlib.util.spec_from_file_location("decode_baseline", baseline_path)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    modules = {"baseline": baseline, "current": decode}

    def one_round(paths: list[str], seed: int) -> dict[str, float]:
        """Clips/s of each module; they take turns video by video, so load changes hit both."""
        for module in modules.values():  # cold frame-count caches: every read misses
            for value in vars(module).values():
                if not isinstance(value, type) and callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()  # lru_cache functions and cache objects, not classes
        seconds = dict.fromkeys(modules, 0.0)
        for v, path in enumerate(paths):
            clips = {}
            for name in list(modules)[:: 1 if v % 2 == 0 else -1]:
                rng = np.random.default_rng([seed, v])  # the same clip for both
                start = time.perf_counter()
                clips[name] = modules[name].read_video(
                    path, lambda n, rng=rng: sampling.tsn_train(n, 8, rng)
                )
                seconds[name] += time.perf_counter() - start
            a, b = clips.values()  # the same work: equal pixels for constant-frame-rate videos
            assert a.shape == (8, HEIGHT, WIDTH, 3) and np.array_equal(a, b), path
        return {name: len(paths) / s for name, s in seconds.items()}

    with tempfile.TemporaryDirectory() as root:
        paths = write_videos(root, videos)
        print(
            f"{videos} mp4 (H.264) and {videos} webm (VP9) videos of {HEIGHT}x{WIDTH}, 2-5 s at "
            f"25/30 fps, keyframes every 1-2 s; one 8-frame TSN training clip per video per "
            f"round, caches cleared each round; {rounds} rounds; 1 process; "
            f"{os.cpu_count()} CPU cores\n"
        )
        print("| files | baseline clips/s | current clips/s | current / baseline |")
        print("|---|---|---|---|")
        for ext in ("mp4", "webm"):
            files = [p for p in paths if p.endswith(ext)]
            one_round(files[:2], seed=rounds)  # warm-up: imports, first-call costs
            rates = {name: [] for name in modules}
            for r in range(rounds):
                for name, rate in one_round(files, seed=r).items():
                    rates[name].append(rate)
            base, cur = np.asarray(rates["baseline"]), np.asarray(rates["current"])
            ratio = cur / base  # per round: both modules ran under the same load

            def spread(x: np.ndarray) -> str:
                return f"{np.median(x):.1f} ({x.min():.1f}-{x.max():.1f})"

            print(
                f"| {ext} | {spread(base)} | {spread(cur)} | {np.median(ratio):.3f} "
                f"({ratio.min():.3f}-{ratio.max():.3f}) |"
            )
        print("\nmedian over rounds (min-max); the ratio is per round, then its median (min-max)")


def config(root: str, source: str, workers: int):
    c = data.get_config()
    c.source, c.root, c.num_classes = source, root, 10
    c.media_dir = "frames" if source == "frames" else "videos"
    c.train_list = c.val_list = "frames.txt" if source == "frames" else "videos.txt"
    c.filename_template = "{:05d}.jpg"
    c.num_workers = workers
    return c  # release defaults: 8 segments, resize 240x320, crop 224


def clips_per_second(make, batches: int, batch_size: int) -> float:
    it = make()
    iterator = iter(it)
    for _ in range(WARMUP):  # worker start-up and filling the read-ahead buffers are not timed
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch_size / (time.perf_counter() - start)
    if hasattr(iterator, "close"):
        iterator.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=24, help="timed batches")
    parser.add_argument("--workers", default="0,1,2", help="worker counts, e.g. 0,2,4")
    parser.add_argument(
        "--decode-baseline",
        metavar="PATH",
        help="compare read_video of the decode.py at PATH with the current one (see above)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --decode-baseline")
    args = parser.parse_args()
    try:
        workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        parser.error(f"--workers: expected counts such as 0,1,2, got {args.workers!r}")
    if not workers or min(workers) < 0:
        parser.error(f"--workers: expected counts of at least 0, got {args.workers!r}")
    for name in ("videos", "frames", "batch", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected at least 1, got {getattr(args, name)}")
    if args.decode_baseline:
        if not os.path.isfile(args.decode_baseline):
            parser.error(f"--decode-baseline: no file {args.decode_baseline}")
        if args.rounds < 1:
            parser.error(f"--rounds: expected at least 1, got {args.rounds}")
        compare_decode(args.decode_baseline, args.videos, args.rounds)
        return
    entries = (args.batches + WARMUP) * args.batch  # eval makes one pass over the list

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_data(root, args.videos, args.frames, entries)
        print(
            f"data: {args.videos} videos x {args.frames} frames of {HEIGHT}x{WIDTH}, listed "
            f"{entries} times "
            f"({time.perf_counter() - start:.0f} s to write); clips of 8 frames at 224x224; "
            f"batch {args.batch}; {os.cpu_count()} CPU cores\n"
        )
        cols = [f"{w} worker{'' if w == 1 else 's'}" for w in workers]
        print("| source | pipeline | " + " | ".join(cols) + " |")
        print("|---|---|" + "---|" * len(workers))
        for source in ("frames", "videos"):
            for mode in ("train", "eval"):
                rates = []
                for w in workers:
                    c = config(root, source, w)
                    if mode == "train":
                        make = lambda c=c: data.make_train_iterator(  # noqa: E731
                            c,
                            global_batch_size=args.batch,
                            seed=0,
                            process_index=0,
                            process_count=1,
                        )
                    else:
                        make = lambda c=c: data.make_eval_iterator(  # noqa: E731
                            c, global_batch_size=args.batch, process_index=0, process_count=1
                        )
                    rates.append(clips_per_second(make, args.batches, args.batch))
                name = "JPEG folders" if source == "frames" else "mp4 (H.264)"
                print(
                    f"| {name} | {mode} | " + " | ".join(f"{r:.1f} clips/s" for r in rates) + " |"
                )


if __name__ == "__main__":
    main()
