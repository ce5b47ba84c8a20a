"""Contract tests run over both architectures and both dimensionalities, plus block-level checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training.networks import NETWORKS, ConvNormAct, ResidualBlock, UNet, build_network, count_parameters

CHANNELS = (4, 8, 16, 32)  # depth 4: sizes must be multiples of 8
SHAPES = {3: (16, 32, 24), 2: (24, 40)}  # valid and non-cubic


def tiny(name: str, spatial_dims: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return build_network(name, spatial_dims=spatial_dims, channels=CHANNELS)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["unet", "resunet"])
class TestNetworkContract:
    def test_forward_shape_non_cubic(self, name, spatial_dims):
        net = tiny(name, spatial_dims)
        x = torch.randn(2, 4, *SHAPES[spatial_dims])
        out = net(x)
        assert out.shape == (2, 3, *SHAPES[spatial_dims])
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()

    def test_outputs_are_logits_not_probabilities(self, name, spatial_dims):
        out = tiny(name, spatial_dims)(torch.randn(1, 4, *SHAPES[spatial_dims]) * 3)
        assert out.min() < 0 or out.max() > 1  # a sigmoid in the graph would keep everything in (0, 1)

    def test_backward_gives_finite_gradients_everywhere(self, name, spatial_dims):
        net = tiny(name, spatial_dims)
        x = torch.randn(2, 4, *SHAPES[spatial_dims], requires_grad=True)
        net(x).square().mean().backward()
        for pname, p in net.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    def test_size_not_divisible_raises(self, name, spatial_dims):
        net = tiny(name, spatial_dims)
        bad = (*SHAPES[spatial_dims][:-1], 20)  # 20 is not a multiple of 8
        with pytest.raises(ValueError, match=r"divisible by 8"):
            net(torch.randn(1, 4, *bad))

    def test_wrong_channels_or_rank_raises(self, name, spatial_dims):
        net = tiny(name, spatial_dims)
        with pytest.raises(ValueError, match=r"expected input \(B, 4"):
            net(torch.randn(1, 3, *SHAPES[spatial_dims]))
        with pytest.raises(ValueError, match=rf"{spatial_dims}D network"):
            net(torch.randn(4, *SHAPES[spatial_dims]))

    def test_rebuild_from_config_through_json(self, name, spatial_dims):
        net = tiny(name, spatial_dims)
        config = json.loads(json.dumps(net.config()))  # as stored in the model card
        rebuilt = build_network(name, **config)
        assert rebuilt.config() == config
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
            k: v.shape for k, v in net.state_dict().items()
        }
        rebuilt.load_state_dict(net.state_dict())
        x = torch.randn(1, 4, *SHAPES[spatial_dims])
        torch.testing.assert_close(rebuilt.eval()(x), net.eval()(x))

    def test_deterministic_under_seed(self, name, spatial_dims):
        x = torch.randn(1, 4, *SHAPES[spatial_dims])
        a, b, c = tiny(name, spatial_dims, seed=1), tiny(name, spatial_dims, seed=1), tiny(name, spatial_dims, seed=2)
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))

    def test_architecture_name_and_divisor(self, name, spatial_dims):
        net = tiny(name, spatial_dims)
        assert net.architecture == name
        assert net.size_divisor == 8 and net.depth == 4
        assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 0


class TestRegistry:
    def test_bad_name_lists_valid_names(self):
        with pytest.raises(ValueError, match=r"'vnet'.*valid names: resunet, unet"):
            build_network("vnet", spatial_dims=3)

    def test_registry_names(self):
        assert set(NETWORKS) == {"unet", "resunet"}
        assert build_network("unet", spatial_dims=3, channels=CHANNELS).block == "conv"
        assert build_network("resunet", spatial_dims=3, channels=CHANNELS).block == "residual"

    def test_block_contradicting_name_raises(self):
        with pytest.raises(ValueError, match=r"'unet' uses block 'conv', got block='residual'"):
            build_network("unet", spatial_dims=3, channels=CHANNELS, block="residual")

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"spatial_dims": 4}, r"spatial_dims must be 2 or 3, got 4"),
            ({"spatial_dims": 3, "channels": ()}, r"non-empty"),
            ({"spatial_dims": 3, "channels": (8, 0)}, r"positive widths"),
            ({"spatial_dims": 3, "block": "dense"}, r"block must be one of \['conv', 'residual'\]"),
        ],
    )
    def test_invalid_options(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            UNet(**kwargs)

    def test_options_are_keyword_only(self):
        with pytest.raises(TypeError):
            UNet(3, 4, 3)

    def test_count_parameters_by_hand(self):
        layer = ConvNormAct(3, 2, 3)  # conv 3*2*27 weights (no bias) + norm 3 weights + 3 biases
        assert count_parameters(layer) == 162 + 6
        layer.norm.requires_grad_(False)
        assert count_parameters(layer, trainable_only=True) == 162

    def test_same_decoder_different_encoder(self):
        shapes = {
            name: {k: v.shape for k, v in tiny(name, 3).state_dict().items() if not k.startswith("encoder.")}
            for name in NETWORKS
        }
        assert shapes["unet"] == shapes["resunet"]


class TestResidualBlock:
    """ResNet-D shortcut (average pooling, then a 1^d projection only where the channels change) and a
    residual branch whose last norm starts at zero."""

    def test_identity_shortcut_when_nothing_changes(self):
        assert isinstance(ResidualBlock(3, 8, 8).shortcut, nn.Identity)

    def test_projection_without_pooling_when_only_the_channels_change(self):
        shortcut = ResidualBlock(3, 4, 8).shortcut
        assert list(dict(shortcut.named_children())) == ["conv", "norm"]
        assert shortcut.conv.kernel_size == (1, 1, 1) and shortcut.conv.stride == (1, 1, 1)
        assert (shortcut.conv.in_channels, shortcut.conv.out_channels) == (4, 8) and shortcut.conv.bias is None
        assert isinstance(shortcut.norm, nn.InstanceNorm3d) and shortcut.norm.affine

    @pytest.mark.parametrize("spatial_dims, pool", [(3, nn.AvgPool3d), (2, nn.AvgPool2d)])
    def test_average_pool_then_projection_when_stride_and_channels_change(self, spatial_dims, pool):
        shortcut = ResidualBlock(spatial_dims, 4, 8, stride=2).shortcut
        assert list(dict(shortcut.named_children())) == ["pool", "conv", "norm"]
        assert isinstance(shortcut.pool, pool) and shortcut.pool.kernel_size in (2, (2,) * spatial_dims)
        assert shortcut.pool.stride in (2, (2,) * spatial_dims)
        assert shortcut.conv.kernel_size == (1,) * spatial_dims and shortcut.conv.stride == (1,) * spatial_dims

    def test_only_average_pool_when_only_the_stride_changes(self):
        shortcut = ResidualBlock(3, 8, 8, stride=2).shortcut
        assert list(dict(shortcut.named_children())) == ["pool"]
        x = torch.randn(1, 8, 4, 4, 4)
        torch.testing.assert_close(shortcut(x), nn.functional.avg_pool3d(x, 2))

    @pytest.mark.parametrize("c_in, c_out, stride", [(8, 8, 1), (4, 8, 1), (8, 8, 2), (4, 8, 2)])
    def test_fresh_block_is_the_activated_shortcut(self, c_in, c_out, stride):
        torch.manual_seed(0)
        block = ResidualBlock(3, c_in, c_out, stride=stride)
        assert torch.count_nonzero(block.conv2.norm.weight) == 0 and torch.count_nonzero(block.conv2.norm.bias) == 0
        x = torch.randn(2, c_in, 8, 8, 8)
        out = block(x)
        assert out.shape == (2, c_out, *(8 // stride,) * 3)
        torch.testing.assert_close(out, nn.functional.leaky_relu(block.shortcut(x), 0.01))
        if c_in == c_out and stride == 1:
            torch.testing.assert_close(out, nn.functional.leaky_relu(x, 0.01))

    def test_residual_branch_still_learns_from_zero(self):
        block = ResidualBlock(3, 4, 8, stride=2)
        block(torch.randn(2, 4, 8, 8, 8)).square().mean().backward()
        assert block.conv2.norm.weight.grad.abs().sum() > 0  # the zero weight gets a gradient

    @pytest.mark.parametrize("c_in, c_out", [(4, 8), (8, 8)])
    def test_strided_shortcut_sees_every_input_voxel(self, c_in, c_out):
        """Changing any single input voxel changes the shortcut's output (a strided 1^d conv would miss 7 in 8)."""
        torch.manual_seed(0)
        shortcut = ResidualBlock(3, c_in, c_out, stride=2).shortcut.eval()
        x = torch.randn(1, c_in, 4, 4, 4)
        reference = shortcut(x)
        for index in range(x[0, 0].numel()):
            bumped = x.clone()
            bumped[0, 0].view(-1)[index] += 3.0
            assert not torch.allclose(shortcut(bumped), reference), index

    def test_zero_init_survives_network_construction(self):
        net = tiny("resunet", 3)  # UNet._init_weights re-initialises the convolutions after the blocks are built
        blocks = [stage for stage in net.encoder if isinstance(stage, ResidualBlock)]
        assert len(blocks) == len(CHANNELS)
        for block in blocks:
            assert torch.count_nonzero(block.conv2.norm.weight) == 0 and torch.count_nonzero(block.conv2.norm.bias) == 0
            assert torch.count_nonzero(block.conv1.norm.weight) == block.conv1.norm.weight.numel()  # only the last
        x = torch.randn(1, 4, 16, 16, 16)
        for block in blocks:  # each stage of a fresh network is its activated shortcut
            expected = nn.functional.leaky_relu(block.shortcut(x), 0.01)
            x = block(x)
            torch.testing.assert_close(x, expected)

    def test_resunet_encoder_projects_only_where_needed(self):
        net = tiny("resunet", 3)  # 4 modalities -> 4, 8, 16, 32
        assert isinstance(net.encoder[0].shortcut, nn.Identity)  # 4 -> 4 at stride 1: nothing changes
        for stage in net.encoder[1:]:
            assert list(dict(stage.shortcut.named_children())) == ["pool", "conv", "norm"]
        wider = UNet(3, channels=(8, 16), block="residual")
        assert list(dict(wider.encoder[0].shortcut.named_children())) == ["conv", "norm"]  # 4 -> 8 at stride 1
