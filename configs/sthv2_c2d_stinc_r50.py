"""Something-Something V2: C2D_STinC_BN ResNet-50, 8 segments, Something-Something V1's recipe.

Run (frames extracted under ROOT as the preset `something_v2` describes; ImageNet start converted
with `python -m aia_jax.convert imagenet --weights resnet50.pth --name C2D_STinC_BN --num-classes 174
--output models/sthv2_c2d_stinc_r50_in1k`):

    python train.py --config configs/sthv2_c2d_stinc_r50.py --workdir runs/sthv2_c2d_stinc_r50 \
        --config.data.root=ROOT --config.init_from=models/sthv2_c2d_stinc_r50_in1k

Evaluate (1 clip × 1 crop, as the release reports):

    python -m aia_jax.evaluate --config configs/sthv2_c2d_stinc_r50.py --checkpoint runs/sthv2_c2d_stinc_r50 \
        --config.data.root=ROOT

Expected result: 60.3 % top-1 / 86.4 % top-5 reported for AIA(TSN),
8 frames, 1 clip × 1 crop; the reference does not say whether that AIA unit is CinST or STinC.
The recipe assumes a global batch of 40 clips; lr is scaled linearly with `batch_size`.
The reference gives the release's recipe for Something-Something V1 only; it is reused
here unchanged, flip label map included.
"""

from configs.common import release_recipe


def get_config():
    return release_recipe("C2D_STinC_BN", "something_v2")
