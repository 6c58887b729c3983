import pytest
import torch
import torchvision

from vlm.models.embedders.trunk import ResNetTrunk, trunk_channels


@pytest.mark.parametrize("name, stride, channels", [("resnet18", 32, 512), ("resnet18", 16, 256), ("resnet50", 32, 2048)])
def test_trunk_stride_and_channels(name, stride, channels):
    trunk = ResNetTrunk(name, stride=stride)
    assert trunk.channels == channels == trunk_channels(name, stride)
    assert trunk(torch.randn(1, 3, 64, 96)).shape == (1, channels, 64 // stride, 96 // stride)


def test_trunk_loads_a_torchvision_state_dict(tmp_path):
    net = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), path)  # with its fc, which the trunk ignores
    trunk = ResNetTrunk("resnet18", weights=str(path))
    torch.testing.assert_close(trunk.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    net.eval(), trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    torch.testing.assert_close(trunk(x), ref, atol=1e-4, rtol=1e-4)


def test_trunk_rejects_a_wrong_file_and_name(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(ValueError, match="r50.pth"):
        ResNetTrunk("resnet18", weights=str(path))
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        ResNetTrunk("vit_b_16")
