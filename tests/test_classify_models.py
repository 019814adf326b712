"""Model construction: timm names, the offline ImageNet Lite0 weights, local weight files, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from dermsynth.classify.config import ModelConfig
from dermsynth.classify.models import build_model
from dermsynth.classify.predict import predict_probs
from dermsynth.config import ConfigError
from dermsynth.data.cache import preprocess
from dermsynth.io import DataError
from dermsynth.pretrained import load_lite0_imagenet, load_state_file


def test_tiny_timm_model_has_seven_class_head():
    model, norm = build_model(ModelConfig(name="test_efficientnet"))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert norm.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)  # from timm's pretrained_cfg
    _, norm_r = build_model(ModelConfig(name="resnet18", drop_rate=0.0))
    assert norm_r.std == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)


def test_unknown_model_and_bad_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        build_model(ModelConfig(name="no_such_net"))
    with pytest.raises(ConfigError, match="tf_efficientnet_lite0"):
        build_model(ModelConfig(name="test_efficientnet", pretrained="lite0"))
    with pytest.raises(ConfigError, match="weight file"):
        build_model(ModelConfig(name="test_efficientnet", pretrained=str(tmp_path / "missing.pt")))


def test_local_weight_file_loads_backbone_and_replaces_head(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = timm.create_model("test_efficientnet", num_classes=1000)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model, _ = build_model(ModelConfig(name="test_efficientnet", pretrained=str(tmp_path / "w.safetensors")))
    own, ref = model.state_dict(), src.state_dict()
    assert own["classifier.weight"].shape == (7, ref["classifier.weight"].shape[1])
    assert all(torch.equal(own[k], ref[k]) for k in own if not k.startswith("classifier."))
    torch.save({"state_dict": timm.create_model("test_resnet").state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        build_model(ModelConfig(name="test_efficientnet", pretrained=str(tmp_path / "other.pt")))


def test_unreadable_weight_files_are_data_errors_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    ok = {"w": torch.zeros(2)}
    cases = {"garbage.pt": b"not a pickle" * 8, "empty.pth": b"", "cut.pt": None, "bad.safetensors": b"\x00" * 64}
    torch.save(ok, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    for name, data in cases.items():
        (tmp_path / name).write_bytes(whole[: len(whole) // 2] if data is None else data)
        with pytest.raises(DataError, match=rf"{name}: not a readable weight file") as e:
            load_state_file(tmp_path / name)
        assert "weights_only=False" not in str(e.value)  # never advise loading untrusted pickles
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(DataError, match=r"list.pt: expected a state dict"):
        load_state_file(tmp_path / "list.pt")
    save_file(ok, tmp_path / "UPPER.SAFETENSORS")  # read as safetensors whatever the case of its suffix
    assert torch.equal(load_state_file(tmp_path / "UPPER.SAFETENSORS")["w"], ok["w"])


def test_lite0_imagenet_loads_strictly_and_sees_a_cat_and_an_espresso():
    skdata = pytest.importorskip("skimage.data")
    model, norm = build_model(ModelConfig(name="tf_efficientnet_lite0", pretrained="lite0", drop_rate=0.0),
                              num_classes=1000)
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)
    imgs = np.stack([preprocess(Image.fromarray(getattr(skdata, n)()), 224) for n in ("chelsea", "coffee")])
    probs = predict_probs(model, torch.from_numpy(imgs), norm, torch.device("cpu"))
    top = probs.argmax(1).tolist()
    assert 281 <= top[0] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert top[1] in (967, 968, 504)  # espresso, cup, coffee mug
    # the 7-class model keeps every backbone weight of the package's checkpoint
    seven, _ = build_model(ModelConfig(name="tf_efficientnet_lite0", pretrained="lite0"))
    ref = load_lite0_imagenet()
    own = seven.state_dict()
    assert own["classifier.weight"].shape == (7, 1280)
    assert all(torch.equal(own[k], ref[k]) for k in ref if not k.startswith("classifier."))
