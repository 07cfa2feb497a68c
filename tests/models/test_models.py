import torch
import torchvision

from sslscale.models import ResNetTrunk, encode_crops
from sslscale.models.backbones import DimensionExpand, DimensionReduce


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_resnet50_trunk_matches_torchvision_without_fc():
    trunk = ResNetTrunk("resnet50")
    assert n_params(trunk) == 23_508_032
    reference = torchvision.models.resnet50().state_dict()
    assert set(trunk.state_dict()) == {k for k in reference if not k.startswith("fc.")}
    assert len(trunk.state_dict()) == 318
    assert trunk.out_dim == 2048


def test_resnet50_d8192_block_matches_the_published_layout():
    trunk = ResNetTrunk("resnet50", dim=8192)
    assert n_params(trunk) == 31_128_640
    extra = {k: v.shape for k, v in trunk.state_dict().items() if k.startswith("resizer.")}
    assert len(extra) == 18
    assert extra["resizer.conv1.weight"] == (512, 2048, 1, 1)
    assert extra["resizer.conv2.weight"] == (512, 512, 3, 3)
    assert extra["resizer.conv3.weight"] == (8192, 512, 1, 1)
    assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 8192)


def test_dimension_expand_is_residual_over_repeated_input():
    block = DimensionExpand(4, 8, hidden=3).eval()
    for p in (block.bn3.weight, block.bn3.bias):  # zero the residual branch
        torch.nn.init.zeros_(p)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(block(x), torch.relu(torch.cat([x, x], 1)))


def test_narrower_representation_uses_a_plain_resizer():
    trunk = ResNetTrunk("resnet18", width=8, dim=16, small_image_stem=True)
    assert isinstance(trunk.resizer, DimensionReduce)
    assert trunk(torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_small_image_stem_is_3x3_stride_1_with_maxpool_kept():
    trunk = ResNetTrunk("resnet18", small_image_stem=True)
    assert trunk.conv1.kernel_size == (3, 3) and trunk.conv1.stride == (1, 1) and trunk.conv1.padding == (1, 1)
    assert isinstance(trunk.maxpool, torch.nn.MaxPool2d)
    assert ResNetTrunk("resnet18").conv1.kernel_size == (7, 7)


def test_width_scales_every_stage():
    trunk = ResNetTrunk("resnet18", width=32)
    assert trunk.out_dim == 256 and trunk.layer1[0].conv1.out_channels == 32


def test_encoder_runs_once_per_resolution_and_matches_per_crop_forward():
    trunk = ResNetTrunk("resnet18", width=8, small_image_stem=True).eval()
    batch_sizes = []
    trunk.register_forward_hook(lambda module, inputs, output: batch_sizes.append(inputs[0].shape[0]))
    crops = [torch.randn(3, 3, 16, 16) for _ in range(2)] + [torch.randn(3, 3, 8, 8) for _ in range(4)]
    features = encode_crops(trunk, crops)
    assert batch_sizes == [6, 12]  # two forwards: 2 large crops together, then 4 small ones
    assert len(features) == 6 and all(f.shape == (3, trunk.out_dim) for f in features)
    with torch.no_grad():
        for crop, feature in zip(crops, features):
            assert torch.allclose(trunk(crop), feature, atol=1e-5)
