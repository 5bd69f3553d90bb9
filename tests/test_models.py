"""Tests for liverseg.models: one shared tester over every registered model, plus the
Enhanced PAN switches, registry errors and local encoder weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in tests

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from liverseg.models import MODEL_NAMES, SegmentationModel, blocks, build_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _encoder_state(model: SegmentationModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_matches_input(name: str) -> None:
    model = build_model(name).eval()
    assert isinstance(model, SegmentationModel)
    assert model.name == name
    with torch.no_grad():
        for shape in [(2, 1, 70, 90), (2, 1, 128, 128)]:  # an odd size and the trained one
            out = model(torch.randn(shape))
            assert out.shape == shape
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_three_class_head_gives_one_logit_map_per_class(name: str) -> None:
    model = build_model(name, classes=3).eval()  # model.num_classes: 3
    with torch.no_grad():
        assert model(torch.randn(2, 1, 70, 90)).shape == (2, 3, 70, 90)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_step_updates_weights(name: str) -> None:
    model = build_model(name).train()
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    # no weight decay: a parameter only changes if a gradient reached it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    x = torch.randn(2, 1, 70, 90)  # odd: the wrapper pads and crops
    y = (torch.rand(2, 1, 70, 90) > 0.5).float()

    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()

    assert torch.isfinite(loss)
    changed = {k for k, p in params.items() if not torch.equal(p, before[k])}
    first, last = next(iter(params)), list(params)[-1]
    assert first.startswith("net.encoder.") and first in changed  # gradient reached the stem
    assert last in changed  # and the head
    # every parameter that received a gradient moved (pspnet leaves deep encoder stages unused)
    assert changed == {k for k, p in params.items() if p.grad is not None and p.grad.any()}


SWITCHES = {
    "se": blocks.SqueezeExcitation,
    "aspp": blocks.ASPP,
    "attention": blocks.SpatialSoftmaxAttention,
    "residual": blocks.ResidualUnit,
}


def _has(model: torch.nn.Module, cls: type) -> bool:
    return any(isinstance(m, cls) for m in model.modules())


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_enhanced_pan_switch_removes_module(switch: str) -> None:
    cls = SWITCHES[switch]
    assert _has(build_model("enhanced_pan"), cls)
    assert not _has(build_model("enhanced_pan", options={switch: False}), cls)


def test_enhanced_pan_all_off_is_plain_pan_decoder() -> None:
    model = build_model("enhanced_pan", options=dict.fromkeys(SWITCHES, False))
    assert _has(model, blocks.FPA) and _has(model, blocks.GAU)
    assert not any(_has(model, cls) for cls in SWITCHES.values())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 1, 64, 64)


def test_enhanced_pan_options_are_applied() -> None:
    model = build_model(
        "enhanced_pan", options={"decoder_channels": 32, "aspp_rates": [1, 2]}, classes=3
    )
    aspp = next(m for m in model.modules() if isinstance(m, blocks.ASPP))
    assert len(aspp.branches) == 3  # 1x1 + two atrous rates
    assert model.net.head.in_channels == 32
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_enhanced_pan_decoder_stride_2_adds_a_finer_level() -> None:
    pan4 = build_model("enhanced_pan")
    pan2 = build_model("enhanced_pan", options={"decoder_stride": 2})
    assert len(pan2.net.levels) == len(pan4.net.levels) + 1
    seen = []
    pan2.net.attention.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    with torch.no_grad():
        assert pan2.eval()(torch.randn(2, 1, 70, 90)).shape == (2, 1, 70, 90)
    assert seen == [(40, 48)]  # padded to 80x96, decoded at 1/2
    with pytest.raises(ValueError, match="decoder_stride must be 2 or 4"):
        build_model("enhanced_pan", options={"decoder_stride": 8})


def test_unknown_model_name_raises() -> None:
    with pytest.raises(ValueError, match="no_such_net") as err:
        build_model("no_such_net")
    assert "enhanced_pan" in str(err.value)  # lists the known names


def test_unknown_option_raises() -> None:
    with pytest.raises(ValueError, match="bogus_switch") as err:
        build_model("enhanced_pan", options={"bogus_switch": True})
    assert "aspp" in str(err.value)  # lists the allowed keys
    with pytest.raises(ValueError, match="se"):
        build_model("pan", options={"se": True})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_encoder_weights_round_trip(tmp_path, suffix: str) -> None:
    source = build_model("enhanced_pan")
    state = _encoder_state(source)
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({f"encoder.{k}": v for k, v in state.items()}, path)  # prefixed keys

    loaded = build_model("enhanced_pan", encoder_weights=str(path))
    fresh = build_model("enhanced_pan")
    got = loaded.encoder.state_dict()
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert not all(torch.equal(fresh.encoder.state_dict()[k], v) for k, v in state.items())


def test_missing_encoder_weights_file_raises(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match="nope.safetensors"):
        build_model("unet", encoder_weights=str(missing))


def test_encoder_weights_without_matching_keys_raise(tmp_path) -> None:
    path = tmp_path / "unrelated.safetensors"
    save_file({"decoder.foo": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="unrelated.safetensors"):
        build_model("enhanced_pan", encoder_weights=str(path))


@pytest.mark.parametrize("name", ["enhanced_pan", "unet_cbam", "manet"])
def test_each_model_starts_from_its_own_earlier_training(tmp_path, name: str) -> None:
    """`encoder_weights: <run>/models/{model}/model.safetensors`: every model's encoder from
    its own full checkpoint (e.g. its liver training, for the tumour task)."""
    from liverseg.config import ModelParams

    earlier = build_model(name)
    (tmp_path / name).mkdir()
    save_file(earlier.state_dict(), str(tmp_path / name / "model.safetensors"))
    weights = ModelParams(encoder_weights=f"{tmp_path}/{{model}}/model.safetensors")
    started = build_model(name, encoder_weights=weights.encoder_weights_for(name))
    expected = _encoder_state(earlier)
    assert all(torch.equal(started.encoder.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("name", ["enhanced_pan", "unet_cbam", "manet"])
def test_imagenet_weights_come_from_the_hub(monkeypatch, name: str) -> None:
    """`encoder_weights: imagenet` reaches timm's hub download (unreachable here: stopped
    at that call) for every model alike."""
    import timm.models._builder as builder

    asked = []

    def offline(model_id, *args, **kwargs):
        asked.append(model_id)
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    with pytest.raises(ConnectionError):
        build_model(name, encoder="tu-efficientnet_b0", encoder_weights="imagenet")
    assert asked and "efficientnet_b0" in str(asked[0])
