"""One configuration: ``config.yaml``, optional override files, then ``key=value`` arguments.

Every setting has exactly one place per script in ``config.yaml``: either at the top (shared by
both scripts) or in ``recipes.st`` / ``recipes.rd`` (the recipe of the paper the script builds on:
STPM for ST, RD4AD for RD), never both, so editing the value you see changes the run. Resolution,
later wins: ``config.yaml`` (top and the script's recipe), then each ``*.yaml`` override file named
on the command line (its top, then its own ``recipes.<script>`` block), then ``section.key=value``.

Every key is declared in :data:`SCHEMA` with its type and allowed values (lists such as the
backbones and datasets come from their registries), so an unknown key, a duplicated key, a key set
in two places of one file, a wrong type or an out-of-range value is refused with one line naming
it. The resolved config is a flat ``dict`` (``"train.lr" -> 0.4``) saved in every checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import math
import re

import yaml

from datasets.registry import DATASET_NAMES
from models.registry import BACKBONES, COMBINE_MODES, DISTILLATION_LOSSES, FUSION_MODES, MEMORY_STAGES, METHODS
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"
# ``train.feature_cache``: the stored dtype of the teacher-feature cache, or no cache (engine/feature_cache.py).
FEATURE_CACHE_CHOICES: tuple[str, ...] = ("float32", "float16", "off")


@dataclass(frozen=True)
class Key:
    """One config key: its Python type, an optional check, and a one-line description for the README."""

    type: type | tuple[type, ...]
    doc: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""  # says what ``check`` requires, for the error message
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    # What the key changes: "train" (what training computes: a checkpoint made with another value
    # does not fit), "eval" (only how a trained model is scored) or "run" (where or how fast).
    scope: str = "train"


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _betas(v: Any) -> bool:
    return len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)


# Every place some student can hold a memory; which student takes which is checked when it is built.
MEMORY_PLACES = tuple(dict.fromkeys(place for places in MEMORY_STAGES.values() for place in places))


def _memory_stages(v: Any) -> bool:
    return all(s in MEMORY_PLACES and not isinstance(s, bool) for s in v)


# A category is a plain folder name of the dataset: never a path, so nothing is written outside output.dir.
_CATEGORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]{0,99}")


def _category(v: str) -> bool:
    return bool(_CATEGORY.fullmatch(v)) and ".." not in v

MAX_SEED = 2**32 - 1  # torch and numpy seeds; per-epoch seeds derived from it stay within int64


SCHEMA: dict[str, Key] = {
    "phase": Key(str, "`train` trains, then evaluates the best checkpoint; `test` only evaluates the saved best "
                      "checkpoint (with the current eval.* settings, leaving the training outputs as they are)",
                 choices=("train", "test"), scope="run"),
    "data.dataset": Key(str, "dataset layout", choices=DATASET_NAMES),
    "data.root": Key(str, "folder that holds the dataset's category folders", scope="run"),
    "data.category": Key(str, "one category (a plain folder name, no path), or `all` for every category in turn",
                         _category, "a plain folder name of at most 100 letters, digits, spaces or _ . + -"),
    # A multiple of 32 so every stage (RD's bottleneck is at stride 32) tiles the image exactly; at
    # least 64 so that bottleneck keeps 2x2 positions, which BatchNorm needs for a batch of one.
    "data.image_size": Key(int, "images (and masks) are resized to this square size; a multiple of 32 from 64 to 1024",
                           lambda v: 64 <= v <= 1024 and v % 32 == 0, "a multiple of 32 from 64 to 1024"),
    "data.val_fraction": Key(float, "share of the TRAIN normal images held out for model selection",
                             lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.download": Key(bool, "download the dataset into data.root when it is missing (MVTec AD, VisA, BTAD, MVTec 3D-AD)",
                         scope="run"),
    "data.num_workers": Key(int, "DataLoader worker processes", _non_negative, ">= 0", scope="run"),
    "model.backbone": Key(str, "teacher network (the ST student copies it)",
                          choices=tuple(BACKBONES)),
    "model.pretrained": Key(bool, "ImageNet teacher through torchvision's pinned IMAGENET1K_V1 weights; false = random init"),
    "model.teacher_weights": Key(str, "local state_dict file for the teacher (overrides the download)", nullable=True),
    "model.fallback_to_random": Key(bool, "if the ImageNet weights cannot be had, warn and use a random teacher instead of failing"),
    "memory.enabled": Key(bool, "false gives the plain baseline (STPM or RD4AD): the paper's ablation"),
    "memory.slots": Key(int, "L, the number of key/value pairs in each memory", _positive, "> 0"),
    "memory.exemplars": Key(int, "N, the fixed exemplar set of normal training images", _positive, "> 0"),
    "memory.temperature": Key(float, "softmax temperature over cosine similarities when reading the memory", _positive, "> 0"),
    "memory.stages": Key(list, "where memories sit: teacher stages whose features are recalled (ST: 1, 2; RD: 3, 2) "
                               "and, for RD, `bottleneck` (the one-class embedding)",
                         _memory_stages, "a list of 1, 2, 3 or bottleneck, e.g. [1,2]"),
    "memory.fusion": Key(str, "how a recalled feature joins the student: `concat` (concatenate, 1x1 conv, BN, ReLU: "
                              "the paper) or `add` (residual sum)", choices=FUSION_MODES),
    "loss.distillation": Key(str, "L_KD form: `stpm` (STPM's squared distance of normalised features per position) or "
                                  "`rd4ad` (RD4AD's 1 - cosine of whole flattened feature maps)",
                             choices=tuple(DISTILLATION_LOSSES)),
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
    "train.seed": Key(int, "seed for the split, the exemplar set, initialisation and shuffling",
                      lambda v: 0 <= v <= MAX_SEED, f"from 0 to {MAX_SEED}"),
    "train.resume": Key(bool, "continue an interrupted run from its last epoch, and skip categories already "
                              "finished with the same config; false retrains from scratch", scope="run"),
    "train.device": Key(str, "`auto` picks CUDA when present", choices=("auto", "cpu", "cuda"), scope="run"),
    "train.amp": Key(bool, "bfloat16 autocast on CUDA (ignored on CPU)"),
    # Speed only. float16 and channels_last change what is computed, so they are training
    # settings; the budget only moves which images stream, which a finished run does not depend on.
    "train.feature_cache": Key(str, "teacher features of the training images computed once per run and kept in memory: "
                                    "`float32` (bit-identical to recomputing them for full batches; a smaller last batch "
                                    "rounds differently), `float16` (half the memory, features rounded) or `off` (the teacher "
                                    "runs in every step)", choices=FEATURE_CACHE_CHOICES),
    "train.cache_budget_mb": Key(int, "memory the teacher-feature cache may take, in MiB (on the training device); "
                                      "images past it are streamed through the teacher in every step",
                                 _non_negative, ">= 0", scope="run"),
    "train.channels_last": Key(bool, "channels-last memory layout for images and features: faster convolutions, "
                                      "but on CPU a MobileNetV2 student's gradients change beyond float rounding"),
    "train.parallel": Key(str, "under torchrun: `categories` (each process trains whole categories of a sweep) or "
                               "`data` (the processes share each batch of one category, gradients averaged)",
                          choices=("categories", "data"), scope="run"),
    "eval.batch_size": Key(int, "evaluation batch size", _positive, "> 0", scope="run"),
    "eval.combine": Key(str, "how per-layer maps make the anomaly map: `product` (STPM's) or `sum` (RD4AD's)",
                        choices=COMBINE_MODES, scope="eval"),
    "eval.sigma": Key(float, "Gaussian smoothing of the anomaly map in pixels (0: none, as STPM; 4: RD4AD)",
                      lambda v: 0 <= v <= 32, "from 0 to 32", scope="eval"),
    "eval.max_pictures": Key(int, "rows of examples.png (best and worst test cases) in each run folder, "
                                  "drawn with roc.png; 0 draws no pictures", _non_negative, ">= 0", scope="run"),
    "output.dir": Key(str, "results go to {output.dir}/{method}/{dataset}/{category}/ (`~` is expanded)",
                      lambda v: bool(v.strip()), "a folder path, not empty", scope="run"),
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing .yaml file") from None
    except yaml.YAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if getattr(e, "problem_mark", None) else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML: {problem}{where}; fix its syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not text (not UTF-8); pass a .yaml file of key: value lines") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise UserError(f"cannot read config file {path} ({e.strerror or e}); pass a readable .yaml file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold sections of key: value pairs")
    return data


def _read_layer(path: Path, method: str) -> dict[str, Any]:
    """The settings one YAML file gives ``method``: its top level and its ``recipes.<method>`` block.

    A key in both places of the same file is refused: one of the two would be ignored.
    """
    tree = _read_yaml(path)
    recipes = tree.pop("recipes", None) or {}
    if not isinstance(recipes, dict) or any(name not in METHODS for name in recipes):
        raise UserError(f"'recipes' in {path} may only hold the blocks {', '.join(METHODS)} (one per script)")
    top = _flatten(tree, str(path))
    recipe = _flatten(recipes.get(method) or {}, f"{path} (recipes.{method})")
    for other in METHODS:  # a typo in the other script's recipe must not wait for that script
        if other != method:
            _flatten(recipes.get(other) or {}, f"{path} (recipes.{other})")
    both = sorted(set(top) & set(recipe))
    if both:
        raise UserError(f"{path} sets '{both[0]}' both at the top and in recipes.{method}; keep one place, "
                        "or one of the two values is ignored")
    return {**top, **recipe}


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
    if spec.type is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{key}' is {value!r}; give a finite number")
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
    Returns a flat dict holding every key of :data:`SCHEMA`, validated, ``output.dir`` with ``~``
    expanded. Raises UserError naming the key on any unknown, duplicated or doubly placed key,
    wrong type or out-of-range value.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    base = Path(base)
    flat = _read_layer(base, method)
    for arg in args:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg:
            flat.update(_read_layer(Path(arg), method))
        else:
            key, value = _parse_override(arg)
            flat[key] = value
    missing = [k for k in SCHEMA if k not in flat]
    if missing:
        raise UserError(f"config key '{missing[0]}' has no value; add it to {base.name} (at the top, "
                        f"or in recipes.{method})")
    return _finish({k: _coerce(k, flat[k]) for k in SCHEMA})


def _finish(config: dict[str, Any]) -> dict[str, Any]:
    config["output.dir"] = str(Path(config["output.dir"]).expanduser())
    return config


def keys_in_scope(scope: str) -> tuple[str, ...]:
    """The keys whose ``scope`` is ``scope`` ("train", "eval" or "run")."""
    return tuple(k for k, spec in SCHEMA.items() if spec.scope == scope)


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check a flat config (e.g. one read back from a checkpoint) against the schema."""
    unknown = [k for k in config if k not in SCHEMA]
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}'")
    missing = [k for k in SCHEMA if k not in config]
    if missing:
        raise UserError(f"config key '{missing[0]}' has no value")
    return _finish({k: _coerce(k, config[k]) for k in SCHEMA})
