"""One configuration: ``config.yaml``, the method's recipe, optional override files, ``key=value``.

Resolution order, later wins:
1. ``config.yaml`` at the repository root (shared keys, the paper settings for MVTec AD);
2. its ``recipes.<method>`` block (the STPM recipe for ``st``, the RD4AD recipe for ``rd``);
3. any ``*.yaml`` files named on the command line (override files such as ``configs/demo.yaml``);
4. ``section.key=value`` arguments.

Every key is declared in :data:`SCHEMA` with its type and allowed values, so an unknown key, a
wrong type or an out-of-range value is refused with one line naming the key.  The resolved config
is a flat ``dict`` (``"train.lr" -> 0.4``) and is saved in every checkpoint and results file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"
METHODS = ("st", "rd")


@dataclass(frozen=True)
class Key:
    """One config key: its Python type, an optional check, and a one-line description for the README."""

    type: type | tuple[type, ...]
    doc: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # says what ``check`` requires, for the error message
    choices: tuple[Any, ...] = ()
    nullable: bool = False


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _betas(v: Any) -> bool:
    return len(v) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v)


SCHEMA: dict[str, Key] = {
    "phase": Key(str, "`train` trains, then evaluates the best checkpoint; `test` only evaluates the saved best checkpoint",
                 choices=("train", "test")),
    "data.dataset": Key(str, "dataset layout", choices=("mvtec", "visa", "mpdd", "mvtec3d", "eyecandies", "btad", "folder", "demo")),
    "data.root": Key(str, "folder that holds the dataset's category folders"),
    "data.category": Key(str, "one category, or `all` for every category of the dataset in turn"),
    # A multiple of 32 so every stage (RD's bottleneck is at stride 32) tiles the image exactly; at
    # least 64 so that bottleneck keeps 2x2 positions, which BatchNorm needs for a batch of one.
    "data.image_size": Key(int, "images (and masks) are resized to this square size; a multiple of 32, at least 64",
                           lambda v: v >= 64 and v % 32 == 0, "a multiple of 32, at least 64"),
    "data.val_fraction": Key(float, "share of the TRAIN normal images held out for model selection",
                             lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.download": Key(bool, "download the dataset into data.root when it is missing (MVTec AD, VisA, BTAD, MVTec 3D-AD)"),
    "data.num_workers": Key(int, "DataLoader worker processes", _non_negative, ">= 0"),
    "model.backbone": Key(str, "teacher network (the ST student copies it)",
                          choices=("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "mobilenet_v2")),
    "model.pretrained": Key(bool, "ImageNet teacher through torchvision's pinned IMAGENET1K_V1 weights; false = random init"),
    "model.teacher_weights": Key(str, "local state_dict file for the teacher (overrides the download)", nullable=True),
    "model.fallback_to_random": Key(bool, "if the ImageNet weights cannot be had, warn and use a random teacher instead of failing"),
    "memory.enabled": Key(bool, "false gives the plain baseline (STPM or RD4AD): the paper's ablation"),
    "memory.slots": Key(int, "L, the number of key/value pairs in each memory", _positive, "> 0"),
    "memory.exemplars": Key(int, "N, the fixed exemplar set of normal training images", _positive, "> 0"),
    "memory.temperature": Key(float, "softmax temperature over cosine similarities when reading the memory", _positive, "> 0"),
    "loss.lambda1": Key(float, "weight of the normality embedding loss L_NM", _non_negative, ">= 0"),
    "loss.lambda2": Key(float, "weight of the orthogonality loss L_Orth", _non_negative, ">= 0"),
    "train.epochs": Key(int, "training epochs", _positive, "> 0"),
    "train.batch_size": Key(int, "training batch size", _positive, "> 0"),
    "train.optimizer": Key(str, "optimiser", choices=("sgd", "adam")),
    "train.lr": Key(float, "learning rate", _positive, "> 0"),
    "train.momentum": Key(float, "SGD momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.betas": Key(list, "Adam betas", _betas, "two numbers in [0, 1), e.g. [0.5,0.999]"),
    "train.weight_decay": Key(float, "weight decay", _non_negative, ">= 0"),
    "train.scheduler": Key(str, "learning-rate schedule", choices=("constant", "cosine")),
    "train.seed": Key(int, "seed for the split, the exemplar set, initialisation and shuffling"),
    "train.resume": Key(bool, "continue an interrupted run from its last epoch, and skip categories already "
                              "finished with the same config; false retrains from scratch"),
    "train.device": Key(str, "`auto` picks CUDA when present", choices=("auto", "cpu", "cuda")),
    "train.amp": Key(bool, "bfloat16 autocast on CUDA (ignored on CPU)"),
    "eval.batch_size": Key(int, "evaluation batch size", _positive, "> 0"),
    "eval.sigma": Key(float, "Gaussian smoothing of the anomaly map, in pixels", _non_negative, ">= 0"),
    "eval.max_pictures": Key(int, "rows of examples.png (best and worst test cases) in each run folder, "
                                  "drawn with roc.png; 0 draws no pictures", _non_negative, ">= 0"),
    "output.dir": Key(str, "results go to {output.dir}/{method}/{dataset}/{category}/"),
}


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _flatten(tree: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Flatten nested YAML sections into dotted keys, refusing keys that are not in SCHEMA."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and dotted not in SCHEMA:
            if not any(k.startswith(dotted + ".") for k in SCHEMA):
                raise UserError(f"unknown config key '{dotted}' in {source}; known sections: {_sections()}")
            flat.update(_flatten(value, source, dotted + "."))
        elif dotted not in SCHEMA:
            raise UserError(f"unknown config key '{dotted}' in {source}; {_near(dotted)}")
        else:
            flat[dotted] = value
    return flat


def _sections() -> str:
    return ", ".join(sorted({k.split(".")[0] for k in SCHEMA}))


def _near(key: str) -> str:
    section = key.split(".")[0]
    same = [k for k in SCHEMA if k.split(".")[0] == section]
    return f"keys of '{section}': {', '.join(same)}" if same else f"known sections: {_sections()}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing .yaml file") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not text (not UTF-8); pass a .yaml file of key: value lines") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise UserError(f"cannot read config file {path} ({e.strerror or e}); pass a readable .yaml file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold sections of key: value pairs")
    return data


def _coerce(key: str, value: Any) -> Any:
    """Check one value against the schema, accepting ints where floats are expected."""
    spec = SCHEMA[key]
    if value is None:
        if spec.nullable:
            return None
        raise UserError(f"config key '{key}' must not be empty; give {_TYPE_NAMES[spec.type]}")
    if spec.type is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; Python reads it as the number the user meant.
        try:
            value = float(value)
        except ValueError:
            pass
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.type is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # YAML reads a category such as 01 as a number
    if (spec.type is int and isinstance(value, bool)) or not isinstance(value, spec.type):
        got = type(value).__name__
        raise UserError(f"config key '{key}' must be {_TYPE_NAMES[spec.type]}, got {got} {value!r}")
    if spec.choices and value not in spec.choices:
        raise UserError(f"config key '{key}' is {value!r}; choose one of {', '.join(map(str, spec.choices))}")
    if spec.check is not None and not spec.check(value):
        raise UserError(f"config key '{key}' is {value!r} but must be {spec.requirement}")
    return value


def _parse_override(arg: str) -> tuple[str, Any]:
    key, sep, text = arg.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise UserError(f"cannot read argument '{arg}'; write overrides as section.key=value, e.g. train.epochs=10")
    if key not in SCHEMA:
        raise UserError(f"unknown config key '{key}'; {_near(key)}")
    if SCHEMA[key].type is str:
        # A category called "01" or a path called "true" must stay a string.
        return key, None if text in ("null", "~", "") and SCHEMA[key].nullable else text
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"cannot read the value of '{key}': {text!r}") from None


def load_config(method: str, args: Iterable[str] = (), base: Path | str = DEFAULT_CONFIG) -> dict[str, Any]:
    """Resolve the configuration for ``method`` ("st" or "rd") from the YAML files and ``args``.

    ``args`` may hold ``*.yaml`` override files and ``section.key=value`` overrides, in order.
    Returns a flat dict holding every key of :data:`SCHEMA`, validated.
    Raises UserError naming the key on any unknown key, wrong type or out-of-range value.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    base = Path(base)
    tree = _read_yaml(base)
    recipes = tree.pop("recipes", {}) or {}
    flat = _flatten(tree, str(base))
    flat.update(_flatten(recipes.get(method, {}) or {}, f"{base} (recipes.{method})"))
    for arg in args:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg:
            override = _read_yaml(Path(arg))
            override.pop("recipes", None)
            flat.update(_flatten(override, arg))
        else:
            key, value = _parse_override(arg)
            flat[key] = value
    missing = [k for k in SCHEMA if k not in flat]
    if missing:
        raise UserError(f"config key '{missing[0]}' has no value; add it to {base.name}")
    return {k: _coerce(k, flat[k]) for k in SCHEMA}


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check a flat config (e.g. one read back from a checkpoint) against the schema."""
    unknown = [k for k in config if k not in SCHEMA]
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}'")
    return {k: _coerce(k, config[k]) for k in SCHEMA}

