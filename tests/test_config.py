"""Typed configs: YAML + ``--set a.b=c`` overrides, type checks, unknown keys, saving beside a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import pytest
import yaml

from dermsynth.cli import main
from dermsynth.config import ConfigError, config_diff, config_hash, load_config, save_config
from dermsynth.data.split import SplitConfig


@dataclass
class Train:
    epochs: int = 10
    lr: float = 3e-4
    amp: bool = True
    sampler: Literal["uniform", "balanced"] = "uniform"
    max_steps: Optional[int] = None


@dataclass
class Cfg:
    name: str = "run"
    classes: list[str] = field(default_factory=lambda: ["df", "vasc"])
    sizes: list[int] = field(default_factory=lambda: [64])
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    out: Path = Path("runs")
    train: Train = field(default_factory=Train)


def test_defaults_and_typed_overrides():
    assert load_config(Cfg) == Cfg()
    cfg = load_config(Cfg, None, ["train.lr=1e-3", "train.epochs=3", "train.amp=false", "train.sampler=balanced",
                                  "classes=df,mel", "sizes=32,64", "fractions=[0.8,0.1,0.1]", "name=42",
                                  "train.max_steps=100", "out=/tmp/x"])
    assert cfg.train == Train(epochs=3, lr=1e-3, amp=False, sampler="balanced", max_steps=100)
    assert cfg.classes == ["df", "mel"] and cfg.sizes == [32, 64] and cfg.fractions == (0.8, 0.1, 0.1)
    assert cfg.name == "42" and cfg.out == Path("/tmp/x")
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.train.epochs, int)
    assert load_config(Cfg, None, ["train.max_steps=null"]).train.max_steps is None
    assert load_config(Cfg, None, ["train.epochs=4.0"]).train.epochs == 4


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: from_yaml\ntrain:\n  epochs: 7\n  lr: 1e-2\n")  # YAML 1.1 reads 1e-2 as a string
    cfg = load_config(Cfg, p, ["train.epochs=9"])
    assert cfg.name == "from_yaml" and cfg.train.epochs == 9 and cfg.train.lr == 0.01 and cfg.train.amp is True


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown key 'lrr' in train; valid keys: \['epochs', 'lr', 'amp', 'sampler', 'max_steps'\]"),
    ("bogus=1", r"unknown key 'bogus'; valid keys: \['name', 'classes'"),
    ("name.x=1", r"'name' has no sub-keys"),
    ("train.epochs=ten", r"train.epochs: expected an integer, got 'ten'"),
    ("train.epochs=1.5", r"expected an integer, got 1.5"),
    ("train.amp=maybe", r"train.amp: expected true/false, got 'maybe'"),
    ("train.sampler=random", r"'random' is not one of \['uniform', 'balanced'\]"),
    ("train.lr=fast", r"train.lr: expected a number"),
    ("fractions=[0.5,0.5]", r"expected 3 values, got 2"),
    ("sizes=32,big", r"sizes\[1\]: expected an integer, got 'big'"),
    ("train=5", r"expected a mapping for Train"),
    ("novalue", r"--set expects key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['epoch'\] in 'train'; valid keys"):
        load_config(Cfg, tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Cfg, tmp_path / "list.yaml")


def test_config_diff_names_each_changed_field_once():
    @dataclass
    class WithMap:
        counts: dict[str, int] = field(default_factory=dict)
        train: Train = field(default_factory=Train)

    assert config_diff(Cfg(), Cfg()) == {}
    assert config_diff(Cfg(), load_config(Cfg, None, ["train.lr=1e-3", "classes=df"])) == {
        "classes": (["df", "vasc"], ["df"]), "train.lr": (3e-4, 1e-3)}
    # a mapping field is one value, not one entry per key: {} -> {nv: 6} is a single change
    assert config_diff(WithMap(), WithMap(counts={"nv": 6})) == {"counts": ({}, {"nv": 6})}
    assert config_diff(Cfg(), Cfg(out=Path("elsewhere"))) == {"out": ("runs", "elsewhere")}


def test_save_round_trip_and_hash(tmp_path):
    cfg = load_config(Cfg, None, ["train.lr=1e-3", "fractions=0.8,0.1,0.1"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["fractions"] == [0.8, 0.1, 0.1]
    assert load_config(Cfg, tmp_path / "run" / "config.yaml") == cfg
    assert config_hash(cfg) == config_hash(load_config(Cfg, tmp_path / "run" / "config.yaml"))
    assert config_hash(cfg) != config_hash(load_config(Cfg, None, ["train.lr=2e-3"]))


def test_cli_overrides(ham_manifest, tmp_path, capsys):
    assert main(["data", "split", "--manifest", str(ham_manifest), "--out", str(tmp_path / "s"),
                 "--set", "fractions=[0.6,0.2,0.2]", "--set", "seed=3"]) == 0
    info = yaml.safe_load((tmp_path / "s" / "split.json").read_text())
    assert info["fractions"] == [0.6, 0.2, 0.2] and info["seed"] == 3
    for bad, needle in (("seeds=1", "valid keys"), ("seed=abc", "expected an integer"), ("mode=3", "unknown split mode")):
        out = tmp_path / f"bad_{bad.split('=')[0]}"
        assert main(["data", "split", "--manifest", str(ham_manifest), "--out", str(out), "--set", bad]) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists()
    assert load_config(SplitConfig, None, ["merge_near_duplicates=true"]).merge_near_duplicates is True


@dataclass
class Seq:
    sizes: Sequence[int] = (64,)
    names: Sequence = ("a",)


def test_sequence_fields_take_lists():
    cfg = load_config(Seq, None, ["sizes=32,64", "names=[x, y]"])
    assert cfg.sizes == [32, 64] and cfg.names == ["x", "y"]
    with pytest.raises(ConfigError, match=r"sizes\[1\]: expected an integer"):
        load_config(Seq, None, ["sizes=[1, x]"])
