"""One configuration: ``config.yaml``, optional override files, then ``key=value`` arguments.

Every setting has exactly one place per script in ``config.yaml``: either at the top (shared by
both scripts) or in ``recipes.st`` / ``recipes.rd`` (the recipe of the paper the script builds on:
STPM for ST, RD4AD for RD), never both, so editing the value you see changes the run. Resolution,
later wins: ``config.yaml`` (top and the script's recipe), then each ``*.yaml`` override file named
on the command line (its top, then its own ``recipes.<script>`` block), then ``section.key=value``.

Every key is declared in :data:`SCHEMA` with its type and allowed values (lists such as the
backbones and datasets come from their registries), so an unknown key, a duplicated key, a key set
in two places of one file, a wrong type or an out-of-range value is refused with one line naming
it. The result is a :class:`RunSettings`: frozen, typed, one dataclass per section
(``settings.train.lr``), built and validated once; ``settings.flat()`` is the resolved mapping
(``"train.lr" -> 0.4``) that every checkpoint and ``results.json`` keep.

Each key is declared once, as a field of its section's dataclass (type, check, description);
:data:`SCHEMA` is read off those fields. Nothing here imports torch, so ``--help`` and config
errors answer at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import math
import re

import yaml

from datasets.registry import DATASET_NAMES
from models.registry import (BACKBONES, COMBINE_MODES, DISTILLATION_LOSSES, FUSION_MODES, MEMORY_STAGES, METHODS,
                             MemoryStage, method_name)
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "config.yaml"
# ``train.feature_cache``: the stored dtype of the teacher-feature cache, or no cache (engine/feature_cache.py).
FEATURE_CACHE_CHOICES: tuple[str, ...] = ("float32", "float16", "off")
COMPILE_CHOICES: tuple[str, ...] = ("off", "step", "cudagraphs")


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
    # (key, value): the key is read only when that other key has that value (SGD's momentum);
    # otherwise it is not part of the run: it resolves to None and never makes two runs differ.
    read_when: tuple[str, Any] | None = None
    path: bool = False  # a file or folder: ``~`` is expanded when the value is read


def setting(type_: type, doc: str, check: Callable[[Any], bool] | None = None, requirement: str = "",
            choices: tuple[Any, ...] = (), nullable: bool = False, scope: str = "train",
            read_when: tuple[str, Any] | None = None, path: bool = False) -> Any:
    """A field of a settings section, declaring its key. No default here: config.yaml holds them."""
    return field(metadata={"key": Key(type_, doc, check, requirement, choices, nullable, scope, read_when, path)})


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _between(low: int, high: int) -> tuple[Callable[[Any], bool], str]:
    """A check and its wording for an integer in [low, high]: sizes beyond any real run are refused
    here, not by the allocator."""
    return (lambda v: low <= v <= high), f"from {low} to {high}"


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

# The one image-size rule (data.image_size, export.py's image_size): a multiple of 32 so every
# stage (RD's bottleneck is at stride 32) tiles the image exactly; at least 64 so that bottleneck
# keeps 2x2 positions, which BatchNorm needs for a batch of one; at most 1024 to bound memory.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 1024
IMAGE_SIZE_RULE = f"a multiple of 32 from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}"


def valid_image_size(v: int) -> bool:
    return MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE and v % 32 == 0


MAX_SEED = 2**32 - 1  # torch and numpy seeds; per-epoch seeds derived from it stay within int64


@dataclass(frozen=True)
class DataSection:
    """What is read: the dataset, its category, and how its images are sized and split."""

    dataset: str = setting(str, "dataset layout", choices=DATASET_NAMES)
    root: str = setting(str, "folder that holds the dataset's category folders (`~` is expanded)",
                        lambda v: bool(v.strip()), "a folder path, not empty", scope="run", path=True)
    category: str = setting(str, "one category (a plain folder name, no path), or `all` for every category in turn",
                            _category, "a plain folder name of at most 100 letters, digits, spaces or _ . + -")
    image_size: int = setting(int, f"images (and masks) are resized to this square size; {IMAGE_SIZE_RULE}",
                              valid_image_size, IMAGE_SIZE_RULE)
    val_fraction: float = setting(float, "share of the TRAIN normal images held out for model selection",
                                  lambda v: 0 <= v < 1, "in [0, 1)")
    download: bool = setting(bool, "download the dataset into data.root when it is missing "
                                   "(MVTec AD, VisA, BTAD, MVTec 3D-AD, MVTec LOCO AD, MVTec AD 2)", scope="run")
    num_workers: int = setting(int, "DataLoader worker processes", *_between(0, 256), scope="run")


@dataclass(frozen=True)
class ModelSection:
    """The teacher network and where its weights come from."""

    backbone: str = setting(str, "teacher network (the ST student copies it)", choices=tuple(BACKBONES))
    pretrained: bool = setting(bool, "ImageNet teacher through torchvision's pinned IMAGENET1K_V1 weights; "
                                     "false = random init")
    teacher_weights: str | None = setting(str, "local state_dict file for the teacher (overrides the download)",
                                          nullable=True, path=True)
    fallback_to_random: bool = setting(bool, "if the ImageNet weights cannot be had, warn and use a random teacher "
                                             "instead of failing")


@dataclass(frozen=True)
class MemorySection:
    """The Normality Recall memories; ``enabled=False`` is the STPM / RD4AD baseline."""

    enabled: bool = setting(bool, "false gives the plain baseline (STPM or RD4AD): the paper's ablation")
    slots: int = setting(int, "L, the number of key/value pairs in each memory", *_between(1, 10_000))
    exemplars: int = setting(int, "N, the fixed exemplar set of normal training images", *_between(1, 10_000))
    temperature: float = setting(float, "softmax temperature over cosine similarities when reading the memory",
                                 _positive, "> 0")
    stages: tuple[MemoryStage, ...] = setting(list, "where memories sit: teacher stages whose features are recalled "
                                                    "(ST: 1, 2; RD: 3, 2) and, for RD, `bottleneck` (the one-class "
                                                    "embedding)", _memory_stages,
                                              "a list of 1, 2, 3 or bottleneck, e.g. [1,2]")
    fusion: str = setting(str, "how a recalled feature joins the student: `concat` (concatenate, 1x1 conv, BN, ReLU: "
                               "the paper) or `add` (residual sum)", choices=FUSION_MODES)


@dataclass(frozen=True)
class LossSection:
    """L = L_KD + lambda1 L_NM + lambda2 L_Orth."""

    distillation: str = setting(str, "L_KD form: `stpm` (STPM's squared distance of normalised features per "
                                     "position) or `rd4ad` (RD4AD's 1 - cosine of whole flattened feature maps)",
                                choices=DISTILLATION_LOSSES)
    lambda1: float = setting(float, "weight of the normality embedding loss L_NM", _non_negative, ">= 0")
    lambda2: float = setting(float, "weight of the orthogonality loss L_Orth", _non_negative, ">= 0")


@dataclass(frozen=True)
class TrainSection:
    """How the student is fitted, and where and how fast that runs."""

    epochs: int = setting(int, "training epochs", *_between(1, 100_000))
    batch_size: int = setting(int, "training batch size", *_between(1, 4096))
    optimizer: str = setting(str, "optimiser", choices=("sgd", "adam"))
    lr: float = setting(float, "learning rate", _positive, "> 0")
    momentum: float | None = setting(float, "SGD momentum (read only with train.optimizer=sgd)",
                                     lambda v: 0 <= v < 1, "in [0, 1)", read_when=("train.optimizer", "sgd"))
    betas: tuple[float, float] | None = setting(list, "Adam betas (read only with train.optimizer=adam)", _betas,
                                                "two numbers in [0, 1), e.g. [0.5,0.999]",
                                                read_when=("train.optimizer", "adam"))
    weight_decay: float = setting(float, "weight decay", _non_negative, ">= 0")
    scheduler: str = setting(str, "learning-rate schedule", choices=("constant", "cosine"))
    seed: int = setting(int, "seed for the split, the exemplar set, initialisation and shuffling",
                        lambda v: 0 <= v <= MAX_SEED, f"from 0 to {MAX_SEED}")
    resume: bool = setting(bool, "continue an interrupted run from its last epoch, and skip categories already "
                                 "finished with the same config; false retrains from scratch", scope="run")
    device: str = setting(str, "`auto` picks CUDA when present", choices=("auto", "cpu", "cuda"), scope="run")
    amp: bool = setting(bool, "bfloat16 autocast on CUDA (ignored on CPU)")
    # Speed settings that change what is computed, so training settings: float16 rounds the
    # features, channels_last the kernels, and the budget decides which images stream, whose
    # features are then computed in smaller batches that round differently (measured: val_kd
    # 2.518 fully cached, 2.539 partly).
    feature_cache: str = setting(str, "teacher features of the training images computed once per run and kept in "
                                      "memory: `float32` (bit-identical to recomputing them for full batches; a "
                                      "smaller last batch rounds differently), `float16` (half the memory, features "
                                      "rounded) or `off` (the teacher runs in every step)",
                                 choices=FEATURE_CACHE_CHOICES)
    cache_budget_mb: int = setting(int, "memory the teacher-feature cache may take, in MiB (on the training device); "
                                        "images past it are streamed through the teacher in every step",
                                   _non_negative, ">= 0")
    channels_last: bool = setting(bool, "channels-last memory layout for images and features: faster convolutions, "
                                        "but on CPU a MobileNetV2 student's gradients change beyond float rounding")
    compile: str = setting(str, "the training step's forward and backward through torch.compile: `off`, `step` "
                                "(fused kernels generated once per batch shape; they round differently from `off`) or "
                                "`cudagraphs` (each batch shape's kernels recorded once and replayed as one CUDA "
                                "graph, no launch per operator; CUDA only, elsewhere the same as `off`)",
                           choices=COMPILE_CHOICES)
    parallel: str = setting(str, "under torchrun: `categories` (each process trains whole categories of a sweep) or "
                                 "`data` (the processes share each batch of one category, gradients averaged)",
                            choices=("categories", "data"), scope="run")


@dataclass(frozen=True)
class EvalSection:
    """How a trained model is scored: changeable without retraining (``phase=test``)."""

    batch_size: int = setting(int, "evaluation batch size", *_between(1, 4096), scope="run")
    combine: str = setting(str, "how per-layer maps make the anomaly map: `product` (STPM's) or `sum` (RD4AD's)",
                           choices=COMBINE_MODES, scope="eval")
    sigma: float = setting(float, "Gaussian smoothing of the anomaly map in pixels (0: none, as STPM; 4: RD4AD)",
                           lambda v: 0 <= v <= 32, "from 0 to 32", scope="eval")
    max_pictures: int = setting(int, "rows of examples.png (best and worst test cases) in each run folder, drawn "
                                     "with roc.png; 0 draws no pictures", _non_negative, ">= 0", scope="run")
    save_maps: bool = setting(bool, "write each test image's anomaly map, exactly the one the metrics were computed "
                                    "from, as a float32 TIFF: maps/<defect type>/<image name>.tiff in the run folder",
                              scope="eval")
    seg_threshold_sigmas: float = setting(float, "MVTec AD 2 (read only with data.dataset=mvtec_ad2): the segmentation threshold (pixel_segf1, the "
                                                 "submission's binary maps) is the mean plus this many standard "
                                                 "deviations of the validation images' pixel scores",
                                          lambda v: 0 <= v <= 100, "from 0 to 100", scope="eval",
                                          read_when=("data.dataset", "mvtec_ad2"))
    submission: str | None = setting(str, "MVTec AD 2 (read only with data.dataset=mvtec_ad2): write the evaluation server's submission for test_private "
                                          "and test_private_mixed into this folder (anomaly_images/: float16 "
                                          "TIFFs; anomaly_images_thresholded/: 0/255 PNGs); null: none",
                                     lambda v: bool(v.strip()), "a folder path, not empty", nullable=True,
                                     scope="eval", read_when=("data.dataset", "mvtec_ad2"), path=True)


@dataclass(frozen=True)
class OutputSection:
    """Where results go."""

    dir: str = setting(str, "results go to {output.dir}/{method}/{dataset}/{category}/ (`~` is expanded)",
                       lambda v: bool(v.strip()), "a folder path, not empty", scope="run", path=True)


SECTIONS: dict[str, type] = {"data": DataSection, "model": ModelSection, "memory": MemorySection,
                             "loss": LossSection, "train": TrainSection, "eval": EvalSection, "output": OutputSection}
_PHASE = setting(str, "`train` trains, then evaluates the best checkpoint; `test` only evaluates the saved best "
                      "checkpoint (with the current eval.* settings, leaving the training outputs as they are)",
                 choices=("train", "test"), scope="run")
# Every key, read off the declarations above: "phase", then "section.name" in declaration order.
SCHEMA: dict[str, Key] = {"phase": _PHASE.metadata["key"],
                          **{f"{name}.{f.name}": f.metadata["key"]
                             for name, section_type in SECTIONS.items() for f in fields(section_type)}}
_EXAMPLES = {"train.momentum": "0.9", "train.betas": "[0.9,0.999]"}


@dataclass(frozen=True)
class RunSettings:
    """One run's resolved configuration: the script's method, the phase, and every section.

    Built by :func:`load_config` (or :meth:`from_flat` for a saved mapping), validated once, never
    changed; :meth:`replace` gives a new, validated one.
    """

    method: str  # "st" (trainRM_ST.py) or "rd" (trainRM_RD.py): the script, not a key
    phase: str
    data: DataSection
    model: ModelSection
    memory: MemorySection
    loss: LossSection
    train: TrainSection
    eval: EvalSection
    output: OutputSection

    @property
    def method_name(self) -> str:
        """'MemKD-ST', 'STPM', 'MemKD-RD' or 'RD4AD'."""
        return method_name(self.method, self.memory.enabled)

    def flat(self) -> dict[str, Any]:
        """The resolved mapping, ``{"phase": ..., "data.dataset": ..., ...}`` in :data:`SCHEMA` order
        with lists as lists: what checkpoints and results.json keep."""
        flat: dict[str, Any] = {"phase": self.phase}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in fields(section):
                value = getattr(section, f.name)
                flat[f"{name}.{f.name}"] = list(value) if isinstance(value, tuple) else value
        return flat

    def scope(self, scope: str) -> dict[str, Any]:
        """The keys of ``scope`` ("train", "eval" or "run") that this run reads, with their values."""
        flat = self.flat()
        return {key: flat[key] for key in keys_in_scope(scope) if _is_read(key, flat)}

    def replace(self, changes: Mapping[str, Any]) -> "RunSettings":
        """These settings with ``changes`` (dotted keys to values) applied and validated again."""
        unknown = [k for k in changes if k not in SCHEMA]
        if unknown:
            raise UserError(f"unknown config key '{unknown[0]}'; {_near(unknown[0])}")
        return RunSettings.from_flat(self.method, {**self.flat(), **changes})

    @classmethod
    def from_flat(cls, method: str, flat: Mapping[str, Any]) -> "RunSettings":
        """Validate a complete flat mapping (load_config's, or one read back from a checkpoint).

        A key the run does not read (``Key.read_when``) may be absent; it resolves to None.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        unknown = [k for k in flat if k not in SCHEMA]
        if unknown:
            raise UserError(f"unknown config key '{unknown[0]}'; {_near(unknown[0])}")
        values: dict[str, Any] = {}
        for key, spec in SCHEMA.items():
            if spec.read_when is None:
                if key not in flat:
                    raise UserError(f"config key '{key}' has no value; add it to config.yaml (at the top, "
                                    f"or in recipes.{method})")
                values[key] = check_value(key, flat[key])
        for key, spec in SCHEMA.items():
            if spec.read_when is not None:
                other, wanted = spec.read_when
                given = None if flat.get(key) is None else check_value(key, flat[key])  # a typo is refused anyway
                if values[other] != wanted:
                    values[key] = None  # not read by this run, so not part of it
                elif given is None and not spec.nullable:
                    raise UserError(f"{other}={wanted} reads config key '{key}', which has no value; give it, "
                                    f"e.g. {key}={_EXAMPLES[key]}")
                else:
                    values[key] = given
        _check_memory_stages(method, values)
        sections = {name: section_type(**{f.name: _frozen(values[f"{name}.{f.name}"]) for f in fields(section_type)})
                    for name, section_type in SECTIONS.items()}
        return cls(method, values["phase"], **sections)


def _frozen(value: Any) -> Any:
    """Lists become tuples, so that frozen settings hold no mutable value."""
    return tuple(value) if isinstance(value, list) else value


def _is_read(key: str, flat: Mapping[str, Any]) -> bool:
    """Whether a run with the settings ``flat`` reads ``key`` (SGD's momentum is not read by Adam)."""
    condition = SCHEMA[key].read_when
    return condition is None or flat.get(condition[0]) == condition[1]


def _check_memory_stages(method: str, values: Mapping[str, Any]) -> None:
    """memory.stages must be distinct places where this script's student can hold a memory."""
    if not values["memory.enabled"]:
        return
    stages, allowed = list(values["memory.stages"]), MEMORY_STAGES[method]
    if not stages or len(set(stages)) != len(stages) or any(s not in allowed for s in stages):
        raise UserError(f"memory.stages={stages} does not fit trainRM_{method.upper()}.py; give distinct "
                        f"places among {list(allowed)}, or memory.enabled=false for no memory")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def _flatten(tree: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Flatten nested YAML sections into dotted keys, refusing keys that are not in SCHEMA."""
    if not isinstance(tree, dict):
        where = f"'{prefix.rstrip('.')}'" if prefix else "it"
        raise UserError(f"{source} must hold key: value pairs in {where}, not {tree!r}")
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and dotted not in SCHEMA:
            if not any(k.startswith(dotted + ".") for k in SCHEMA):
                raise UserError(f"unknown config key '{dotted}' in {source}; known sections: {_sections()}")
            flat.update(_flatten(value, source, dotted + "."))
        elif dotted not in SCHEMA:
            if any(k.startswith(dotted + ".") for k in SCHEMA):
                raise UserError(f"'{dotted}' in {source} is a section: it must hold key: value pairs, not {value!r}")
            raise UserError(f"unknown config key '{dotted}' in {source}; {_near(dotted)}")
        else:
            flat[dotted] = value
    return flat


def _sections() -> str:
    return ", ".join(sorted({k.split(".")[0] for k in SCHEMA}))


def _near(key: str, schema: Mapping[str, Key] | None = None) -> str:
    """What the user may have meant: the keys of the same section, or every key a program takes."""
    if schema is not None and schema is not SCHEMA:
        return f"the keys are {', '.join(schema)}"
    section = key.split(".")[0]
    same = [k for k in SCHEMA if k.split(".")[0] == section]
    return f"keys of '{section}': {', '.join(same)}" if same else f"known sections: {_sections()}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain name, not a list or "
                                                        "mapping", key_node.start_mark)
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


def check_value(key: str, value: Any, schema: Mapping[str, Key] | None = None) -> Any:
    """``value`` checked against ``key``'s declaration in ``schema`` (the config's by default), accepting
    ints where floats are expected; UserError naming the key when it does not fit."""
    schema = SCHEMA if schema is None else schema
    spec = schema[key]
    what = f"config key '{key}'" if schema is SCHEMA else f"{key}"
    if value is None:
        if spec.nullable:
            return None
        raise UserError(f"{what} must not be empty; give {_TYPE_NAMES[spec.type]}")
    if spec.type is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; Python reads it as the number the user meant.
        try:
            value = float(value)
        except ValueError:
            pass
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.type is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{what} is {value!r}; give a finite number")
    if spec.type is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # YAML reads a category such as 01 as a number
    if (spec.type is int and isinstance(value, bool)) or not isinstance(value, spec.type):
        got = type(value).__name__
        raise UserError(f"{what} must be {_TYPE_NAMES[spec.type]}, got {got} {value!r}")
    if spec.choices and value not in spec.choices:
        raise UserError(f"{what} is {value!r}; choose one of {', '.join(map(str, spec.choices))}")
    if spec.check is not None and not spec.check(value):
        raise UserError(f"{what} is {value!r} but must be {spec.requirement}")
    if spec.path and value.startswith("~"):
        try:
            value = str(Path(value).expanduser())
        except RuntimeError:  # ~name of no user, or no home folder at all
            raise UserError(f"{what} is {value!r}, whose '~' names no home folder here; give the full path") from None
    return value


def parse_override(arg: str, schema: Mapping[str, Key] | None = None) -> tuple[str, Any]:
    """``(key, value)`` of one ``key=value`` argument, the value read as YAML unless ``key`` holds a
    string; the one parser of the training scripts, predict.py and export.py. ``schema`` (the
    config's by default) says which keys exist; the value is checked later, with the others.
    UserError for a malformed argument or an unknown key."""
    schema = SCHEMA if schema is None else schema
    key, sep, text = arg.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        form = "overrides as section.key=value, e.g. train.epochs=10" if schema is SCHEMA else \
            f"key=value, e.g. {next(iter(schema))}=..."
        raise UserError(f"cannot read argument '{arg}'; write {form}")
    if key not in schema:
        raise UserError(f"unknown {'config key' if schema is SCHEMA else 'argument'} '{key}'; {_near(key, schema)}")
    if schema[key].type is str:
        # A category called "01" or a path called "true" must stay a string.
        return key, None if text in ("null", "~", "") and schema[key].nullable else text
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"cannot read the value of '{key}': {text!r}") from None


def load_config(method: str, args: Iterable[str] = (), base: Path | str = DEFAULT_CONFIG) -> RunSettings:
    """Resolve the settings of ``method`` ("st" or "rd") from the YAML files and ``args``.

    ``args`` may hold ``*.yaml`` override files and ``section.key=value`` overrides, in order.
    Raises UserError naming the key on any unknown, duplicated or doubly placed key, missing,
    wrong-typed or out-of-range value.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    flat = _read_layer(Path(base), method)
    for arg in args:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg:
            flat.update(_read_layer(Path(arg), method))
        else:
            key, value = parse_override(arg)
            flat[key] = value
    return RunSettings.from_flat(method, flat)


def keys_in_scope(scope: str) -> tuple[str, ...]:
    """The keys whose ``scope`` is ``scope`` ("train", "eval" or "run")."""
    return tuple(k for k, spec in SCHEMA.items() if spec.scope == scope)


# Keys added after runs were first recorded, with the value every earlier run had: a checkpoint or
# results.json written before a key existed compares as what it was, not as a different run.
ADDED_KEYS: dict[str, Any] = {"train.compile": "off", "eval.save_maps": False, "eval.submission": None}


def config_differences(saved: Mapping[str, Any], current: RunSettings, scope: str = "train") -> list[str]:
    """'key=saved (checkpoint) vs current (now)' for each key of ``scope`` that ``current`` reads
    and that differs from the ``saved`` mapping (a checkpoint's or results.json's)."""
    def was(key: str) -> Any:
        return saved.get(key, ADDED_KEYS.get(key))

    return [f"{k}={was(k)!r} (checkpoint) vs {value!r} (now)"
            for k, value in current.scope(scope).items() if was(k) != value]
