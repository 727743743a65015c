import dataclasses
from pathlib import Path

import pytest

from ktray.config import Config, config_hash, load_config, parse_overrides, to_yaml
from ktray.errors import KtrayError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ktray" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert cfg.methods


def test_packaged_name_resolves_and_overrides_apply():
    cfg = load_config(
        "demo",
        [
            "teacher.img_size=128",
            "distill.temperature=4",
            "methods=[scratch,task@generic]",
            "out=s3://b/run",
        ],
    )
    assert cfg.teacher.img_size == 128 and isinstance(cfg.teacher.img_size, int)
    assert cfg.distill.temperature == 4.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.methods == ["scratch", "task@generic"]
    assert cfg.out == "s3://b/run"


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(KtrayError, match=r"unknown config key 'teacher.bakbone'.*teacher.backbone"):
        load_config("demo", ["teacher.bakbone=vit"])
    with pytest.raises(KtrayError, match="unknown config key 'nope'"):
        load_config(None, ["nope=1"])


def test_wrong_type_and_bad_override_are_one_line_errors():
    with pytest.raises(KtrayError, match="expects int"):
        load_config(None, ["teacher.img_size=big"])
    with pytest.raises(KtrayError, match="key.sub=value"):
        parse_overrides(["teacher.img_size"])
    with pytest.raises(KtrayError, match=r"config file not found: /no/such.yaml \(packaged: demo,"):
        load_config("/no/such.yaml")
    # an override where the config goes (`ktray run out=/tmp/x`): says where it belongs
    with pytest.raises(KtrayError, match=r"overrides follow it, e.g. `demo out=/tmp/x`"):
        load_config("out=/tmp/x")


def test_yaml_roundtrip_and_hash(tmp_path):
    cfg = load_config("tiny", ["data.root=/x"])
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(str(p))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert config_hash(cfg.teacher) == config_hash(again.teacher)
    again.teacher.lr = 0.5
    assert config_hash(cfg.teacher) != config_hash(again.teacher)
