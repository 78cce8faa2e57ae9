"""Video input pipeline: frame folders, video files, TFDS and a built-in synthetic dataset.

Host batches are dicts of numpy arrays (train: `video` uint8 `[b, T, H, W, 3]`, `label` int32;
eval adds a views axis, `video` `[b, V, T, H, W, 3]`, and `index`, `valid`); `to_global` makes
them global `jax.Array`s and `normalize` turns pixels into network input on the device.
"""

from aia_jax.data.config import class_names, describe_split, get_config, num_classes, resolve
from aia_jax.data.device import normalize, to_global
from aia_jax.data.errors import (
    BadSampleError,
    DataError,
    bad_sample_count,
    bad_samples,
    reset_bad_sample_count,
)
from aia_jax.data.pipeline import (
    EvalIterable,
    eval_view_shape,
    eval_views,
    make_eval_iterator,
    make_train_iterator,
    num_eval_examples,
    num_train_examples,
    steps_per_epoch,
)

__all__ = [
    "BadSampleError",
    "DataError",
    "EvalIterable",
    "bad_sample_count",
    "bad_samples",
    "class_names",
    "describe_split",
    "eval_view_shape",
    "eval_views",
    "get_config",
    "make_eval_iterator",
    "make_train_iterator",
    "normalize",
    "num_classes",
    "num_eval_examples",
    "num_train_examples",
    "reset_bad_sample_count",
    "resolve",
    "steps_per_epoch",
    "to_global",
]
