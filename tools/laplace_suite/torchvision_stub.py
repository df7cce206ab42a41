"""A stand-in for ``torchvision.models.wide_resnet50_2``, used only when torchvision cannot be
imported.

laplace-torch's test modules ``test_baselaplace``, ``test_lllaplace`` and ``test_subnetlaplace``
import ``wide_resnet50_2`` at module level for their "large model" tests (construction only,
never a forward pass through trained weights). torchvision's wheels must match the installed
torch build exactly (a CUDA torchvision does not load next to a CPU torch), so where none is
importable the plugin registers this module as ``torchvision`` / ``torchvision.models``. The
network is torchvision's Wide ResNet-50-2 (bottleneck blocks [3, 4, 6, 3], width 128 per group,
``fc`` 2048 -> 1000, torchvision's initialization): the same modules, names and 68,883,240
parameters.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

from torch import Tensor, nn

__all__ = ["install", "wide_resnet50_2"]


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (stride on the 3 x 3 convolution)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None, width: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with bottleneck blocks."""

    def __init__(self, layers: list[int], width_per_group: int, num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.width_per_group = width_per_group
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], 1)
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        width = int(planes * (self.width_per_group / 64.0))
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, width)]
        self.inplanes = out
        layers += [Bottleneck(out, planes, 1, None, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def wide_resnet50_2(**kwargs: object) -> ResNet:
    """torchvision's ``wide_resnet50_2()`` (random weights; ``weights=`` is not supported)."""
    if kwargs.get("weights") is not None:
        raise ValueError("the torchvision stand-in has no pretrained weights")
    return ResNet([3, 4, 6, 3], width_per_group=128)


def install() -> bool:
    """Register the stand-in as ``torchvision.models`` if torchvision cannot be imported.

    Call it after importing laplace-torch: torchmetrics (which laplace-torch imports) decides at
    its import whether torchvision is there, and should see that it is not.

    Returns:
        ``True`` if the stand-in was installed, ``False`` if torchvision imports.
    """
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # a missing or broken (mismatched build) torchvision
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        return False
    package = types.ModuleType("torchvision")
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    package.__path__ = []
    models = types.ModuleType("torchvision.models")
    models.__spec__ = importlib.machinery.ModuleSpec("torchvision.models", None)
    models.wide_resnet50_2 = wide_resnet50_2
    package.models = models
    sys.modules["torchvision"] = package
    sys.modules["torchvision.models"] = models
    return True
