"""Diving48: C2D ResNet-50, 8 segments, Something-Something V1's recipe.

Run (frames extracted under ROOT as the preset `diving48` describes; ImageNet start converted
with `python -m aia_jax.convert imagenet --weights resnet50.pth --name C2D --num-classes 48
--output models/diving48_c2d_r50_in1k`):

    python train.py --config configs/diving48_c2d_r50.py --workdir runs/diving48_c2d_r50 \
        --config.data.root=ROOT --config.init_from=models/diving48_c2d_r50_in1k

Evaluate (1 clip × 1 crop, as the release reports):

    python -m aia_jax.evaluate --config configs/diving48_c2d_r50.py --checkpoint runs/diving48_c2d_r50 \
        --config.data.root=ROOT

Expected result: not reported in the release.
The recipe assumes a global batch of 40 clips; lr is scaled linearly with `batch_size`.
The reference gives the release's recipe for Something-Something V1 only; it is reused
here unchanged (horizontal flip without a label map: the reference gives one for
Something-Something only).
"""

from configs.common import release_recipe


def get_config():
    return release_recipe("C2D", "diving48")
