"""Config resolution: recipes, override files, key=value, and one-line refusals."""
import subprocess
import sys
from pathlib import Path

import pytest

from utils.config import SCHEMA, load_config, validate
from utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_recipes_give_each_script_its_paper_settings():
    st, rd = load_config("st"), load_config("rd")
    assert (st["train.optimizer"], st["train.lr"], st["train.momentum"], st["train.epochs"], st["train.batch_size"],
            st["model.backbone"]) == ("sgd", 0.4, 0.9, 100, 32, "resnet18")
    assert (rd["train.optimizer"], rd["train.lr"], rd["train.betas"], rd["train.epochs"], rd["train.batch_size"],
            rd["model.backbone"]) == ("adam", 0.005, [0.5, 0.999], 200, 16, "wide_resnet50_2")
    assert st["data.image_size"] == rd["data.image_size"] == 256
    assert set(st) == set(SCHEMA)


def test_overrides_apply_in_order_and_are_typed(tmp_path):
    extra = tmp_path / "small.yaml"
    extra.write_text("train:\n  epochs: 3\ndata:\n  image_size: 64\n")
    config = load_config("rd", [str(extra), "train.epochs=5", "memory.enabled=false", "data.category=01",
                                "train.betas=[0.9,0.99]", "train.lr=1e-3", "model.teacher_weights=null"])
    assert config["train.epochs"] == 5 and config["data.image_size"] == 64
    assert config["memory.enabled"] is False and config["data.category"] == "01"
    assert config["train.betas"] == [0.9, 0.99] and config["train.lr"] == 0.001
    assert config["model.teacher_weights"] is None


def test_int_is_accepted_for_float_keys():
    assert load_config("st", ["loss.lambda2=1"])["loss.lambda2"] == 1.0


@pytest.mark.parametrize("arg, fragment", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("nosuch.key=1", "unknown config key 'nosuch.key'"),
    ("train.epochs=three", "'train.epochs' must be an integer"),
    ("train.epochs=0", "'train.epochs' is 0 but must be > 0"),
    ("train.lr=-0.1", "'train.lr' is -0.1 but must be > 0"),
    ("memory.slots=0", "'memory.slots'"),
    ("memory.temperature=0", "'memory.temperature'"),
    ("model.backbone=vgg16", "choose one of resnet18"),
    ("data.image_size=100", "multiple of 32"),
    ("data.image_size=32", "at least 64"),
    ("memory.enabled=maybe", "'memory.enabled' must be true or false"),
    ("train.betas=[0.5]", "'train.betas'"),
    ("loss.lambda1=-1", "'loss.lambda1'"),
    ("justaword", "write overrides as section.key=value"),
])
def test_bad_overrides_are_refused_naming_the_key(arg, fragment):
    with pytest.raises(UserError, match=None) as error:
        load_config("st", [arg])
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown config key 'train.learning_rate'"):
        load_config("st", [str(bad)])
    with pytest.raises(UserError, match="does not exist"):
        load_config("st", [str(tmp_path / "missing.yaml")])


def test_saved_config_round_trips():
    config = load_config("st")
    assert validate(dict(config)) == config


def test_cli_exits_2_with_one_line_for_a_bad_key():
    result = subprocess.run([sys.executable, "trainRM_ST.py", "train.epochz=1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: unknown config key")
    assert "Traceback" not in result.stderr


def test_every_key_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in SCHEMA if f"`{key}`" not in readme]
    assert not missing, f"README.md does not document {missing}"
