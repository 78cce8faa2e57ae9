"""Errors of the input pipeline and the counter of samples skipped under `on_bad_sample='skip'`."""

from __future__ import annotations

import collections
import threading

from aia_jax.errors import UserError


class DataError(UserError):
    """A configuration or input error; the message is one line naming the file (and line)."""


class BadSampleError(DataError):
    """A sample that could not be read mid-epoch (missing frame, undecodable image or video)."""


_lock = threading.Lock()
_skipped = 0
_recent: collections.deque[str] = collections.deque(maxlen=100)


def record_skip(message: str) -> None:
    """Counts one skipped sample (called in the main process, where batches are assembled)."""
    global _skipped
    with _lock:
        _skipped += 1
        _recent.append(message)


def bad_sample_count() -> int:
    """Samples skipped in this process since start (or the last reset), over all iterators."""
    return _skipped


def bad_samples() -> list[str]:
    """Messages of the last (up to 100) skipped samples, oldest first."""
    with _lock:
        return list(_recent)


def reset_bad_sample_count() -> None:
    global _skipped
    with _lock:
        _skipped = 0
        _recent.clear()
