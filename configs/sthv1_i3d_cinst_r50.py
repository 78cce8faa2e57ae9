"""Something-Something V1: I3D_CinST_BN ResNet-50, 8 segments, the release's recipe.

Run (frames extracted under ROOT as the preset `something_v1` describes; ImageNet start converted
with `python -m aia_jax.convert imagenet --weights resnet50.pth --name I3D_CinST_BN --num-classes 174
--output models/sthv1_i3d_cinst_r50_in1k`):

    python train.py --config configs/sthv1_i3d_cinst_r50.py --workdir runs/sthv1_i3d_cinst_r50 \
        --config.data.root=ROOT --config.init_from=models/sthv1_i3d_cinst_r50_in1k

Evaluate (1 clip × 1 crop, as the release reports):

    python -m aia_jax.evaluate --config configs/sthv1_i3d_cinst_r50.py --checkpoint runs/sthv1_i3d_cinst_r50 \
        --config.data.root=ROOT

Expected result: no 3D result in the release: this is aia-jax's own form.
Frames: 8 segments, as the 2D forms (see `configs/common.py`); `--config.data.sampling=dense3d`
reads dense clips instead.
The recipe assumes a global batch of 40 clips; lr is scaled linearly with `batch_size`.
"""

from configs.common import release_recipe


def get_config():
    return release_recipe("I3D_CinST_BN", "something_v1")
