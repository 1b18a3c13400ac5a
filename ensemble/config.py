"""The one config system: dataclass defaults, a YAML file on top, `key=value` overrides on top of that.

Every key is validated against the dataclasses below: an unknown key or a value of the wrong type is
a `ConfigError` that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .layout import RunDir

TOP_K = 32  # generalist.top_k's default, chosen by measurement (BENCHMARKS.md, "Sparse predictions")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def at_least(low: float) -> dict:
    """Field metadata: the value must be >= low (null passes where the type allows it)."""
    return {"valid": (lambda v: v >= low, f">= {low}")}


def above(low: float) -> dict:
    return {"valid": (lambda v: v > low, f"> {low}")}


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> dict:
    """Field metadata: the value must lie between low and high, each end closed unless said open."""
    def valid(v: float) -> bool:
        return (low < v if low_open else low <= v) and (v < high if high_open else v <= high)

    return {"valid": (valid, f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")}


@dataclass
class DataConfig:
    """Where the images come from and how the validation split is carved."""

    source: Literal[
        "glyphs", "digits", "synthetic", "npz", "emnist", "omniglot", "cifar100", "imagefolder"
    ] = "synthetic"
    path: str | None = None  # npz file or image folder; torchvision-backed sets: their root (null: <cache>/<source>)
    download: bool = False  # torchvision-backed sets (emnist, omniglot, cifar100): fetch missing files
    num_classes: int = field(default=1000, metadata=at_least(2))  # glyphs, synthetic
    train_per_class: int = field(default=300, metadata=at_least(1))  # glyphs, synthetic
    test_per_class: int = field(default=20, metadata=at_least(1))  # glyphs, synthetic
    group_size: int = field(default=10, metadata=at_least(1))  # synthetic: classes per planted confusable group
    noise: float = field(default=1.0, metadata=at_least(0))  # synthetic: standard deviation of the pixel noise (how hard the classes are to tell apart)
    image_size: int = field(default=28, metadata=at_least(4))  # glyphs, synthetic, omniglot; imagefolder: the side
    #   of the square crop the net sees
    train_transform: Literal["crop_flip", "none"] = field(default="crop_flip", metadata={"neutral": "crop_flip"})
    #   imagefolder: training images through a random resized crop and a horizontal flip, or the evaluation
    #   transform (resize the short side, centre crop)
    channels: Literal[1, 3] = field(default=3, metadata={"neutral": 3})  # imagefolder: grey or RGB (every image is converted)
    workers: int = field(default=2, metadata={"hashed": False, **at_least(0)})  # imagefolder: DataLoader processes that
    #   decode images (0: in the training process); not part of any result
    bad_images: Literal["error", "skip"] = field(default="error", metadata={"neutral": "error"})  # imagefolder: a file
    #   that is not a readable image stops the run naming it, or is left out (checked once, counted in a warning)
    val_fraction: float = field(default=0.1, metadata=between(0, 1, low_open=True, high_open=True))  # held out
    layout: Literal["auto", "NHW", "NHWC", "NCHW"] = field(default="auto", metadata={"neutral": "auto"})
    #   how 4-D images are laid out (npz); auto: channels are the axis of size 1, 3 or 4, an error where both could be
    missing_classes: Literal["error", "warn"] = field(default="error", metadata={"neutral": "error"})
    #   a class with no training example (in the test set only, or nowhere: a stray label): an error, or a warning
    seed: int = 0  # generators and the validation split (the run's seed drives training)


def _net_name(v: str) -> bool:
    return v in ("mlp", "cnn", "resnet") or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v) is not None


@dataclass
class NetConfig:
    """A network from `ensemble.nets` by name: built in, any torchvision classification model, or a factory."""

    name: str = field(default="cnn", metadata={"valid": (_net_name, "mlp, cnn, resnet, 'torchvision:<builder>' "
                                                                   "or '<module.path>:<callable>'")})
    width: int = field(default=32, metadata=at_least(1))  # mlp: hidden units; cnn, resnet: first stage channels
    depth: int = field(default=1, metadata=at_least(1))  # mlp: hidden layers; cnn: convs per stage; resnet: blocks
    dropout: float = field(default=0.0, metadata=between(0, 1, high_open=True))  # built-in nets
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={"neutral": {}})  # torchvision builders and
    #   factories: keyword arguments besides num_classes (and a factory's input_shape)
    weights: str | None = field(default=None, metadata={"neutral": None, "by_content": True})  # start training from a weights file
    #   (safetensors or a PyTorch state dict), or `torchvision`: the builder's default pretrained weights
    head: str | None = field(default=None, metadata={"neutral": None})  # the final nn.Linear's path in the model
    #   (as named_modules() names it: fc, classifier.3, heads.head); null: the one whose output is the model's


@dataclass
class TrainConfig:
    """The training loop's settings, shared by every stage that trains a network."""

    epochs: int | Literal["auto"] = field(default=12, metadata={"valid": (
        lambda v: v == "auto" or v >= 1, ">= 1 or 'auto'")})  # auto: until the validation top-1 stops improving
    #   (`patience` epochs without a new best, at most `max_epochs`); the best epoch's weights are kept
    patience: int = field(default=3, metadata={"neutral": 3, **at_least(1)})  # epochs without a new best validation
    #   top-1 before `epochs: auto` stops, or `schedule: plateau` divides the learning rate by 10
    max_epochs: int = field(default=100, metadata={"neutral": 100, **at_least(1)})  # epochs: auto's cap, and the
    #   horizon of the cosine schedule under it
    smooth_epochs: int = field(default=1, metadata={"neutral": 1, **at_least(1)})  # the stalls are counted on the
    #   mean validation top-1 of the last this many epochs, so that one lucky epoch does not stall it (1: each
    #   epoch's own); the kept epoch is still the best single one
    batch_size: int = field(default=128, metadata=at_least(1))
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = field(default=2e-3, metadata=above(0))
    momentum: float = field(default=0.9, metadata=between(0, 1, high_open=True))  # sgd only
    weight_decay: float = field(default=5e-4, metadata=at_least(0))
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"  # after the warm-up: cosine decay to zero over
    #   the epochs, constant, or constant divided by 10 each time the validation top-1 stalls for `patience`
    #   epochs, twice at most, keeping the best epoch's weights (with epochs: auto it then stops at the third
    #   stall: a converged net)
    warmup_epochs: float = field(default=0.5, metadata=at_least(0))
    label_smoothing: float = field(default=0.0, metadata=between(0, 1, high_open=True))
    augment: Literal["none", "shift", "affine"] = "shift"
    amp: bool = True  # mixed precision, on CUDA only
    channels_last: bool = True  # memory format of conv nets
    eval_batch_size: int = field(default=1024, metadata=at_least(1))
    workers: int = field(default=1, metadata={"neutral": 1, **at_least(1)})  # data-parallel Ray Train workers,
    #   each taking batch_size examples a step: the global batch, which lr and the schedule are for, is
    #   batch_size x workers; 1: this process alone


@dataclass
class GeneralistConfig:
    """Stage 1: one network over all classes."""

    net: NetConfig = field(default_factory=lambda: NetConfig(name="mlp", width=8, depth=1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=24, augment="none"))
    top_k: int | None = field(default=TOP_K, metadata=at_least(1))  # its held-out and test predictions keep each
    #   example's top_k probabilities and the mass of the rest (null, or top_k >= C/2: all of them, and the logits)
    checkpoint: str | None = field(default=None, metadata={"neutral": None, "by_content": True})  # a generalist you already have:
    #   weights for `net` (safetensors or a PyTorch state dict); the stage evaluates it instead of training


@dataclass
class ClusterConfig:
    """Stage 2: K-means on the columns of the covariance of the generalist's held-out predictions.

    Sizes left at null are set from the number of classes C (see `cluster.resolve`)."""

    shape: Literal["partition", "overlapping"] = "overlapping"  # disjoint subsets, or fixed-size overlapping (paper)
    num_subsets: int | None = field(default=None, metadata=at_least(1))  # M; null: round(sqrt(C))
    min_size: int | None = field(default=None, metadata=at_least(1))  # partition: fewest classes in a subset; null: ceil(C / M / 4)
    max_size: int | None = field(default=None, metadata=at_least(1))  # partition: most classes in a subset; null: ceil(3 C / M)
    subset_size: int | None = field(default=None, metadata=at_least(1))  # overlapping: classes in every subset; null: ceil(1.5 C / M)
    inputs: Literal["probs", "logits"] = "probs"  # held-out probabilities, or logits centred per example
    statistic: Literal["covariance", "correlation"] = "correlation"
    diagonal: Literal["keep", "zero"] = "keep"
    normalise: Literal["unit", "none"] = "unit"  # scale each column to unit length before K-means
    embedding: int | None = field(default=None, metadata=at_least(1))  # embed the matrix's columns in this many dimensions
    #   (its top eigenvectors, from the sparse predictions: no C×C matrix); null: 256 above 4,096 classes, else the matrix
    pca_components: int | None = field(default=None, metadata=at_least(1))  # project the columns on this many principal components before K-means
    kmeans: Literal["full", "minibatch"] = "full"  # scikit-learn KMeans, or the on-line MiniBatchKMeans
    n_init: int = field(default=10, metadata=at_least(1))  # K-means restarts (seeded by the run's seed)
    batch_size: int = field(default=1024, metadata=at_least(1))  # minibatch only
    random_draws: int = field(default=10, metadata=at_least(1))  # random subsets of the same sizes, the baseline of the confusion capture


@dataclass
class SpecialistsConfig:
    """Stage 3: one network per class subset (its classes plus a dustbin), started from the generalist."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=16, warmup_epochs=0.2, augment="none"))
    head: Literal["dustbin", "full"] = "dustbin"  # full: the paper's §6.1, a softmax over all classes whose
    #   classes outside the subset learn the generalist's soft targets (its output seen as subset + dustbin)
    in_subset_fraction: float = field(default=0.5, metadata=between(0, 1, low_open=True, high_open=True))  # rho: the share of every batch drawn from the subset's own classes
    dustbin_correction: Literal["prior", "none", "validation"] = "prior"  # the shift of the dustbin logit:
    #   the prior ratio's, none, or per specialist whichever of the two has the lower validation NLL
    freeze_trunk: bool = False  # train the head alone on the generalist's features (branch_at: all the blocks)
    branch_at: int | str = field(default=0, metadata={"neutral": 0, "valid": (
        lambda v: v != "" if isinstance(v, str) else v >= 0, ">= 0 or a module name")})  # share the generalist's
    #   first K blocks (frozen, its weights; at inference run once for all specialists) and own copies of the
    #   blocks after them and the head; 0: whole-network specialists. Blocks: an MLP's hidden layers, the CNN's 4
    #   stages, the ResNet's 3; any other net's trunk is one block, or is cut after the module a name gives
    #   (a torchvision ResNet's layer3: the specialists own layer4 and the head)
    head_hidden: int = field(default=0, metadata={"neutral": 0, **at_least(0)})  # a hidden ReLU layer of this many units in each specialist's head, added to the
    #   linear head and starting with no effect; with freeze_trunk: capacity of its own on a shared trunk
    width: int | None = field(default=None, metadata=at_least(1))  # the specialists' net width (null: the generalist's); wider ones start as the
    #   generalist widened, their new units with no effect on the output until trained
    skip_largest: int = field(default=0, metadata=at_least(0))  # give the largest subsets (K-means' "rarely confused" catch-all) no specialist
    select_on_validation: bool = True  # keep the trained weights only if they beat the start (the generalist's
    #   own) in conditional top-1 on the subset's validation examples; else the specialist stays at its start
    subsets: str | None = None  # a YAML file of subsets (lists of class names or ids) to use instead of the cluster's


@dataclass
class BaselinesConfig:
    """Stage 4: the bar the ensemble must clear, the generalist's net trained from scratch for as long as
    the ensemble."""

    budgets: list[Literal["compute", "wall_clock", "inference"]] = field(
        default_factory=lambda: ["compute", "wall_clock", "inference"])
    #   compute: the generalist's and all specialists' training compute; wall_clock: the generalist's and the
    #   longest specialist's (every specialist on a worker of its own); inference: the generalist's net widened
    #   to the ensemble's multiply-adds per example, trained for the compute budget; []: no baselines


def specialist_net_config(cfg: "Config") -> NetConfig:
    """The specialists' net: the generalist's, at `specialists.width` if set."""
    width = cfg.specialists.width
    return cfg.generalist.net if width is None else dataclasses.replace(cfg.generalist.net, width=width)


@dataclass
class CombineConfig:
    """Stage 5, combiner: how the generalist and the specialists are combined, and evaluated on the test set."""

    top_n: list[int] = field(default_factory=lambda: [1, 2, 5], metadata={"valid": (
        lambda v: len(v) > 0 and all(n >= 1 for n in v), "a non-empty list of integers >= 1")})  # the first is the ensemble's; all are evaluated
    method: Literal["fixed_point", "gradient", "within_subset", "auto"] = "within_subset"  # the paper's KL
    #   objective (solved by EM, or by gradient descent as in the paper), or the within-subset rule, which trusts
    #   the generalist for which subset and the specialist for which class inside it (see combiner.solver);
    #   auto: fixed_point or within_subset, whichever has the higher validation top-1 (the combiner stage chooses)


@dataclass
class DistillBackConfig:
    """Stage 6: one student learns the ensemble's combined distribution q* (the combiner at the first
    `combine.top_n`) on the transfer set."""

    net: NetConfig | Literal["inference"] | None = None  # the student; null: the generalist's architecture;
    #   inference: the baselines stage's equal-inference-cost net (the ensemble's cost at inference)
    init: Literal["generalist", "scratch"] = "generalist"  # start from the generalist's weights (same net, or
    #   the inference net: the generalist widened, its new units with no effect until trained)
    temperature: float = field(default=2.0, metadata=above(0))
    alpha: float = field(default=0.9, metadata=between(0, 1))  # the soft term's weight; 1 - alpha goes to the hard labels
    top_k: int | None = field(default=TOP_K, metadata=at_least(1))  # soft targets keep each example's top_k classes
    #   and one tail bucket with the rest's mass (null: every class)
    augmented_copies: int = field(default=0, metadata=at_least(0))  # more transfer inputs, unlabelled: the training images under random affine maps
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, lr=5e-4, warmup_epochs=0.2,
                                                                   augment="none"))  # q* is of the clean images
    control: bool = True  # also train the same student on the generalist's soft targets alone (self-distillation)


@dataclass
class LaunchConfig:
    """Where a stage's parallel tasks run. It never changes what they compute."""

    backend: Literal["inline", "ray"] = "ray"  # inline: one after another in this process
    address: str | None = None  # an existing Ray cluster; null: $RAY_ADDRESS if set, else start a local one
    num_cpus: float = field(default=1.0, metadata=at_least(0))  # per task; torch in the task uses this many threads
    num_gpus: float | None = field(default=None, metadata={"valid": (lambda v: 0 <= v <= 1 or v == int(v),
                                                                    "in [0, 1] or a whole number")})  # per task; fractions let several
    #   tasks share a GPU; null: one per task when the Ray cluster has GPUs (or can add nodes with them), else 0
    resource_timeout: float = field(default=600.0, metadata=at_least(0))  # seconds to wait for an autoscaling
    #   cluster to add a node that can run a task; a cluster that cannot scale fails at once
    max_retries: int = field(default=3, metadata=at_least(0))  # how often a task whose worker died is started again (it resumes from its checkpoint);
    #   for a data-parallel training (train.workers > 1), how often its worker group is
    storage_path: str | None = None  # where data-parallel trainings keep their checkpoints: a folder every node mounts
    #   (NFS) or a URI (s3://, gs://); null: the stage's folder in the run directory (one machine only)


@dataclass
class Config:
    """The whole resolved config of a run."""

    name: str = "default"  # the run lives in <runs_dir>/<name>
    runs_dir: str = "runs"
    seed: int = 0
    device: str = field(default="auto", metadata={"valid": (
        lambda v: re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v) is not None, "auto, cpu, cuda or cuda:N")})
    data: DataConfig = field(default_factory=DataConfig)
    generalist: GeneralistConfig = field(default_factory=GeneralistConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    distill_back: DistillBackConfig = field(default_factory=DistillBackConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def read_yaml(path: str | Path, what: str, error: type[Exception] = ValueError) -> typing.Any:
    """The YAML (or JSON) file at `path`, read with safe_load; a missing, binary or malformed file is an
    `error` that names it as `what` ("config file", "subsets file") in one line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a text file (YAML or JSON)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{what} {path} is not valid YAML or JSON: {_yaml_problem(e)}{where}") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What a YAML parser found wrong, in a few words."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides (dotted keys)."""
    raw = to_dict(Config())
    if path is not None:
        loaded = read_yaml(path, "config file", ConfigError)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        _merge(raw, loaded or {}, prefix="")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value of '{key.strip()}' is not valid YAML: "
                              f"{_yaml_problem(e)}") from None
        _merge(raw, _nest(key.strip(), parsed), prefix="")
    return from_dict(Config, raw)


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run directory holds, pointing at that directory wherever it now lies."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (it has no config.yaml)")
    cfg = from_dict(Config, read_yaml(path, "run config"))
    cfg.runs_dir, cfg.name = str(Path(run_dir).parent), Path(run_dir).name
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (what config.yaml holds)."""
    return dataclasses.asdict(cfg)


def config_hash(*parts: Any) -> str:
    """A stable hash of config sections (dataclasses or plain values). A field at its `neutral` value
    (field metadata: the value that does what the code did before the field existed) is left out, so
    that adding an option leaves the runs made before it done; so is a file path marked `by_content`,
    whose file's contents the stage hashes instead (a moved file is the same input), and a field marked
    `hashed: False`, which changes how a result is computed, never the result."""
    plain = json.dumps(parts, sort_keys=True, default=lambda o: _hashed(o) if dataclasses.is_dataclass(o) else str(o))
    return hashlib.sha256(plain.encode()).hexdigest()[:16]


def _hashed(section: Any) -> dict:
    """A dataclass's fields for its hash, those at their neutral value left out."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if not ("neutral" in f.metadata and getattr(section, f.name) == f.metadata["neutral"])
            and not f.metadata.get("by_content") and f.metadata.get("hashed", True)}


def from_dict(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `raw`, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key(prefix + str(key), sorted(names)))
    kwargs = {k: _check(hints[k], v, prefix + k) for k, v in raw.items()}
    for f in dataclasses.fields(cls):
        valid, means = f.metadata.get("valid", (None, ""))
        if valid is not None and kwargs.get(f.name) is not None and not valid(kwargs[f.name]):
            raise ConfigError(f"config key '{prefix}{f.name}' must be {means}, got {kwargs[f.name]!r}")
    return cls(**kwargs)


def _check(tp: Any, value: Any, key: str) -> Any:
    """Validate (and lightly coerce: int or a numeric string such as 5e-4 to float) one value against its annotated type."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check(inner[0], value, key)
        for option in inner:
            if dataclasses.is_dataclass(option) and isinstance(value, dict):  # a section: its own errors
                return _check(option, value, key)
            try:
                return _check(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be {' or '.join(map(_describe, inner))}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{key}' must be a mapping of names to values, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _describe(tp: Any) -> str:
    """A type as a config error names it: int, or 'auto' for Literal["auto"]."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping of its keys"
    return getattr(tp, "__name__", str(tp))


def _merge(base: dict, update: dict, prefix: str) -> None:
    """Deep-merge `update` into `base`; keys unknown to `base` are left for `from_dict` to reject."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, prefix + f"{key}.")
        else:
            base[key] = value


def _nest(dotted: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _unknown_key(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys here: {', '.join(known)})"
    return f"unknown config key '{key}'{hint}"
