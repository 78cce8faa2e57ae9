"""Input pipeline throughput: clips/s of the train and eval pipelines, JPEG folders vs mp4.

Writes its own small data set under a temporary directory (textured 240x320 frames, as JPEG
folders and as H.264 mp4 files), then times 8-frame 224x224 clips through the real pipeline
(`make_train_iterator`: TSN sampling, multi-scale crop, flip; `make_eval_iterator`: centre
frames, centre crop) with 0, 1 and 2 worker processes, and prints a markdown table.

    python3 bench/input_pipeline.py                       # defaults below
    python3 bench/input_pipeline.py --workers 0,2,4 --batches 20 --videos 64

Worker start-up is excluded (the first batches are not timed). The numbers are for this machine and
its load at the time; the table says how many cores it has.
"""

from __future__ import annotations

import argparse
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
