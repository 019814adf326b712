"""SD-1.5 base weights: the errors a user without weights sees, and loading a local diffusers folder (tiny, random)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dermsynth.config import ConfigError, load_config
from dermsynth.generate.config import GenConfig
from dermsynth.generate.sd15.config import SDConfig
from dermsynth.generate.sd15.weights import SD15_HUB_ID, default_base_dir, load_components, resolve_base
from dermsynth.pretrained import WeightsNotFoundError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from dermsynth.generate.sd15.random_base import save_random_base

    return save_random_base(tmp_path_factory.mktemp("sd15") / "base", "tiny")


def _says_what_to_do(msg: str) -> None:
    assert "hf download" in msg and SD15_HUB_ID in msg  # what to download
    assert str(default_base_dir()) in msg and "sd.base" in msg  # where to put it / how to point at it


def test_no_base_configured_says_what_to_download_and_where():
    assert not default_base_dir().exists()  # tests run with a private cache folder
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_base(SDConfig())
    _says_what_to_do(str(e.value))


def test_missing_path_and_incomplete_folder(tmp_path, tiny_base):
    with pytest.raises(WeightsNotFoundError, match="not an existing file or folder") as e:
        resolve_base(SDConfig(base=str(tmp_path / "nowhere")))
    _says_what_to_do(str(e.value))
    partial = Path(shutil.copytree(tiny_base, tmp_path / "partial"))
    shutil.rmtree(partial / "unet")
    (partial / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match=r"lacks unet, vae/ weights"):
        resolve_base(SDConfig(base=str(partial)))


def test_single_file_needs_a_local_config_folder(tmp_path):
    ckpt = tmp_path / "v1-5-pruned-emaonly.safetensors"
    ckpt.write_bytes(b"\0")
    with pytest.raises(WeightsNotFoundError, match="needs sd.base_config"):
        resolve_base(SDConfig(base=str(ckpt)))
    assert resolve_base(SDConfig(base=str(ckpt), base_config=str(tmp_path))) == ("single_file", str(ckpt.resolve()))


def test_hub_id_offline_fails_with_instructions_not_a_download():
    with pytest.raises(WeightsNotFoundError) as e:
        load_components(SDConfig(base="nobody-here/no-such-sd15-model"))
    _says_what_to_do(str(e.value))


def test_local_folder_loads_frozen_in_dtype(tiny_base):
    parts = load_components(SDConfig(base=str(tiny_base)), torch.bfloat16)
    assert parts["base"] == str(tiny_base.resolve())
    for name in ("unet", "vae", "text_encoder"):
        assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in parts[name].parameters()), name
    assert parts["scheduler"].config.prediction_type == "epsilon"
    assert len(parts["tokenizer"]) == parts["text_encoder"].config.vocab_size


def test_cli_without_weights_exits_2_with_the_instructions(tmp_path, capsys):
    from dermsynth.cli import main

    rc = main(["train-gen", "-c", str(REPO / "configs" / "sd15_lora.yaml"), "--set", "data.split=x.json",
               "--out", str(tmp_path / "run")])
    assert rc == 2
    _says_what_to_do(capsys.readouterr().err)


def test_shipped_config_is_valid_and_sd15():
    cfg = load_config(GenConfig, REPO / "configs" / "sd15_lora.yaml", ["sd.base=/models/sd15"])
    assert cfg.kind == "sd15_lora" and cfg.sd.resolution == 512 and cfg.sd.base == "/models/sd15"
    assert cfg.sd.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    with pytest.raises(ConfigError):
        load_config(GenConfig, REPO / "configs" / "sd15_lora.yaml", ["sd.lora_rnak=4"])


def test_random_base_leaves_the_callers_rng_alone():
    from dermsynth.generate.sd15.random_base import random_components

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = random_components("tiny", seed=0)["unet"].state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = random_components("tiny", seed=0)["unet"].state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())  # the weights still depend on the seed only
