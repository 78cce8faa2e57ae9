"""EGTEA Gaze+ split 1: C2D_CinST_BN ResNet-50, 8 segments, Something-Something V1's recipe.

Run (frames extracted under ROOT as the preset `egtea_split1` describes; ImageNet start converted
with `python -m aia_jax.convert imagenet --weights resnet50.pth --name C2D_CinST_BN --num-classes 106
--output models/egtea1_c2d_cinst_r50_in1k`):

    python train.py --config configs/egtea1_c2d_cinst_r50.py --workdir runs/egtea1_c2d_cinst_r50 \
        --config.data.root=ROOT --config.init_from=models/egtea1_c2d_cinst_r50_in1k

Evaluate (1 clip × 1 crop, as the release reports):

    python -m aia_jax.evaluate --config configs/egtea1_c2d_cinst_r50.py --checkpoint runs/egtea1_c2d_cinst_r50 \
        --config.data.root=ROOT

Expected result: about 63.7 % reported for AIA(TSN) (the reference names no metric),
8 frames, 1 clip × 1 crop; the reference does not say whether that AIA unit is CinST or STinC.
The recipe assumes a global batch of 40 clips; lr is scaled linearly with `batch_size`.
The reference gives the release's recipe for Something-Something V1 only; it is reused
here unchanged (horizontal flip without a label map: the reference gives one for
Something-Something only).
"""

from configs.common import release_recipe


def get_config():
    return release_recipe("C2D_CinST_BN", "egtea_split1")
