"""Experiment configuration: one YAML file, ``--set a.b=c`` overrides, strict validation.

Defaults live in exactly one place: the dataclasses of ``dcpnas`` for the method, and the
models below for the pipeline. Every run saves its resolved config and that config's hash.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from dcpnas.checkpoint import config_hash
from dcpnas.search import SearchConfig
from pipeline.errors import UserError

STRICT = ConfigDict(extra="forbid", validate_assignment=True)
PACKAGED = Path(__file__).parent / "configs"


def section_from_dataclass(cls: type) -> type[BaseModel]:
    """A strict pydantic model mirroring a ``dcpnas`` dataclass, so defaults are not repeated."""
    hints = get_type_hints(cls)
    spec = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Section", __config__=STRICT, **spec)


SearchSection = section_from_dataclass(SearchConfig)


class DataSection(BaseModel):
    """Where images come from and how search batches are cut.

    ``source: digits`` reads scikit-learn's bundled digits into memory (single-process search);
    ``source: shards`` streams the converted dataset at ``uri`` (any fsspec URI), split by rank.
    """

    model_config = STRICT
    source: Literal["digits", "shards"] = "digits"
    uri: str | None = None
    split: str = "train"  # the split that search cuts into weights / arch parts
    eval_split: str = "test"  # held-out images for supernet accuracy
    batch_size: int = Field(64, gt=0)  # global: divided among data-parallel workers
    held_out_fraction: float = Field(0.2, gt=0, lt=1)  # digits in memory only: the class-balanced test part
    weight_fraction: float = Field(0.5, gt=0, le=1)  # of the search split (ImageNet, PC-DARTS: 0.1)
    arch_fraction: float = Field(0.5, gt=0, le=1)  # of the search split (ImageNet, PC-DARTS: 0.025)
    split_seed: int = 0
    image_size: int = Field(8, gt=0)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random-resized-crop area range; (1, 1) = no crop
    flip: bool = False  # horizontal flips (not for digits)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    loader_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.source == "shards" and not self.uri:
            raise ValueError("data.uri is required when data.source is 'shards'")
        if self.weight_fraction + self.arch_fraction > 1 + 1e-9:
            raise ValueError("data.weight_fraction + data.arch_fraction must be <= 1")
        return self


class SweepSection(BaseModel):
    """A Ray Tune grid of searches: every seed × every space, each trial one ``TorchTrainer``.

    A trial reserves ``trial_cpus`` (its Tune driver function) plus ``workers`` × ``cpus_per_worker``
    (its DDP ranks). Fractions are scheduling tokens: on 2 cores, 0.5 + 1 × 0.5 lets two trials run
    side by side; whole CPUs for both would deadlock (docs/stack.md §2.2).
    """

    model_config = STRICT
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    # the paper's space and its cheaper 3x3 variant (why not dcpnas_conv at demo size: docs/search.md)
    spaces: list[str] = Field(default_factory=lambda: ["dcpnas_3x3", "dcpnas"], min_length=1)
    workers: int = Field(1, gt=0)  # DDP ranks per trial
    cpus_per_worker: float = Field(0.5, gt=0)
    trial_cpus: float = Field(0.5, gt=0)  # the trial's driver function; Tune refuses 0
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(2, ge=0)  # restarts of a failed trial (Tune) and of its workers (Train)
    storage_path: str | None = None  # Ray results/checkpoints; default <output_dir>/<name>/ray
    num_cpus: float | None = Field(None, gt=0)  # local Ray only (no RAY_ADDRESS); default: the machine's
    # Override axes (docs/search.md): trials = seeds x spaces x (grid product x variants), each a dict of
    # dotted search.* keys -> values; an empty grid or variants list contributes one empty override set.
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    variants: list[dict[str, Any]] = Field(default_factory=list)


class RetrainSection(BaseModel):
    """Two-step 1-bit retraining of chosen genotypes with knowledge distillation (method §9).

    ``steps`` are binarisation stages run in order, each initialised from the previous one's
    model artifact: the published recipe is ``binary_act`` (real weights, 1-bit activations)
    then ``binary_all``. ``teacher``: ``train`` (the pipeline first trains the real-valued network
    of the same genotype; the repo's torchvision ResNet-34 cannot be had offline), ``none``
    (cross-entropy on labels only), or the URI of a teacher model file written by this stage.
    """

    model_config = STRICT
    genotype: str | None = None  # set: retrain this (run id, models:/name@alias, JSON, built-in), no sweep
    network: Literal["cifar", "imagenet"] = "cifar"  # macro-architecture (method §9.4 / §9.1)
    init_channels: int = Field(16, gt=0)
    layers: int = Field(8, ge=3)
    style: Literal["bnn", "darts"] = "bnn"  # op internals: the repo's BN-conv-BN-PReLU, or DARTS' ReLU-conv-BN
    binarize_depthwise_input: bool = False  # method §2.3 book variant; the repo keeps depthwise inputs real
    steps: list[Literal["real", "binary_act", "binary_all"]] = Field(
        default_factory=lambda: ["binary_act", "binary_all"], min_length=1
    )
    epochs: int = Field(256, gt=0)  # per step
    batch_size: int = Field(512, gt=0)  # global, divided among workers
    lr: float = Field(1e-3, gt=0)  # AdamW; the repo's 1e-3 is for a global batch of 512
    min_lr: float = Field(1e-5, ge=0)  # cosine floor, stepped per epoch
    weight_decay: list[float] = Field(default_factory=lambda: [1e-5, 0.0], min_length=1)  # per step; last repeats
    teacher: str = "train"  # train | none | URI of a teacher model file
    teacher_epochs: int = Field(30, ge=0)
    teacher_lr: float = Field(1e-3, gt=0)
    label_weight: float = Field(0.0, ge=0)  # weight of label cross-entropy next to KD; the repo uses KD only
    reconstruction_weight: float = Field(5e-5, ge=0)  # x L_R (sum ||w - beta sign w||^2): the repo's 1e-4 / 2
    image_size: int | None = Field(None, gt=0)  # None: data.image_size
    crop_scale: tuple[float, float] | None = None  # None: data.crop_scale
    engine: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: int = Field(1, ge=0, le=3)
    bf16: bool | Literal["auto"] = "auto"  # auto: on with CUDA, off on CPU
    workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    max_failures: int = Field(2, ge=0)
    # retrains side by side (each its own worker group); None: as many as the cluster holds at once
    max_concurrent: int | None = Field(None, gt=0)
    top_k: int = Field(1, ge=0)  # genotypes a sweep sends on to retraining (0: none)
    seed: int = 0
    # Random-genotype control (docs/retrain.md): k uniform genotypes per retrained space, same recipe.
    random_baselines: int = Field(0, ge=0)
    random_ops_tolerance: float | None = Field(None, gt=0)  # |OPs / searched OPs - 1| bound; None: any OPs
    random_seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> RetrainSection:
        if self.min_lr > self.lr:
            raise ValueError("retrain.min_lr must be <= retrain.lr")
        if self.batch_size % self.workers:
            raise ValueError(f"retrain.batch_size {self.batch_size} must divide by retrain.workers {self.workers}")
        if self.zero_stage == 3:
            raise ValueError(
                "retrain.zero_stage 3 is not supported: ZeRO-3 partitions the conv weights that the reconstruction "
                "loss L_R reads outside the forward pass; use 0, 1 or 2 (DCP-NAS-L has 12 M parameters, so stage 3 "
                "would save nothing)"
            )
        return self

    def step_weight_decay(self, index: int) -> float:
        return self.weight_decay[min(index, len(self.weight_decay) - 1)]


class TrackingSection(BaseModel):
    """MLflow: ``uri`` None → ``MLFLOW_TRACKING_URI`` or ``sqlite:///./mlruns/mlflow.db``; experiment → name.

    ``retry_s``: how long a tracking write (epoch metrics, tags, artifacts, run open/finish) is retried
    through server errors and restarts before it fails its trial (docs/tracking.md, "Transient failures").
    Credentials are never config fields: MLflow reads ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``.
    """

    model_config = STRICT
    uri: str | None = None
    experiment: str | None = None
    retry_s: float = Field(300.0, ge=0)


class Config(BaseModel):
    """The whole experiment."""

    model_config = STRICT
    name: str = "demo"
    output_dir: str = "runs"
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = torch's default
    # On an autoscaling cluster: how long a stage waits for the autoscaler to add the nodes its workers need
    # before its resource check fails (0: check the cluster as it is). GPU nodes take minutes to boot.
    scale_up_wait_s: float = Field(0.0, ge=0)
    data: DataSection = DataSection()
    search: SearchSection = SearchSection()  # type: ignore[valid-type]
    sweep: SweepSection = SweepSection()
    retrain: RetrainSection = RetrainSection()
    tracking: TrackingSection = TrackingSection()

    def search_config(self) -> SearchConfig:
        try:
            return SearchConfig(**self.search.model_dump())
        except ValueError as e:
            raise UserError(f"config: {e}") from None

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def hash(self) -> str:
        return config_hash(self.resolved())

    @property
    def experiment(self) -> str:
        """The MLflow experiment every run of this config opens into: ``tracking.experiment``, else ``name``."""
        return self.tracking.experiment or self.name

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str = "--set") -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"{origin} {dotted}: '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def _get_path(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[key]
    return tree


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=c`` with ``c`` read as YAML (numbers, booleans, lists), e.g. ``sweep.seeds=[0,1]``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects key=value, got '{item}'")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: cannot parse value '{raw}': {e}") from None


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"  {field}: {e['msg']}{got}")
    return f"invalid config {origin}:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None: the packaged demo), apply overrides, validate strictly."""
    path = Path(path) if path is not None else PACKAGED / "demo.yaml"
    if not path.exists():
        packaged = PACKAGED / f"{path.name}"
        if path.parent == Path(".") and packaged.exists():
            path = packaged
        else:
            raise UserError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise UserError(f"config {path} must be a mapping of sections")
    for item in overrides or []:
        _set_path(tree, *parse_override(item))
    cfg = _validate(tree, f"'{path}'")
    override_sets(cfg)  # every sweep trial's config is valid, or the error names its key now
    return cfg


def _validate(tree: dict[str, Any], origin: str) -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_errors(e, origin)) from None
    try:
        cfg.search_config()  # cross-field checks of the method
    except UserError as e:
        raise UserError(f"{e} ({origin})") from None
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any], origin: str = "override") -> Config:
    """``cfg`` with dotted ``key: value`` overrides applied and validated like ``--set`` (errors name the key)."""
    tree = cfg.resolved()
    for key, value in overrides.items():
        _set_path(tree, key, value, origin)
    return _validate(tree, f"{origin} {overrides}")


def override_sets(cfg: Config) -> list[dict[str, Any]]:
    """The sweep's override sets (grid product x variants, a variant's value winning over the grid's),
    validated and canonical: values as the config holds them (``lam: 0`` -> 0.0), duplicates dropped."""
    s = cfg.sweep
    for key in [*s.grid, *(k for v in s.variants for k in v)]:
        if key in ("search.seed", "search.space"):
            raise UserError(f"sweep override '{key}': seeds and spaces are the sweep.seeds / sweep.spaces axes")
        if not key.startswith("search."):
            raise UserError(
                f"sweep override '{key}': only search.* keys vary per trial (all trials share the data split and "
                "the retrain recipe); set it in the config itself"
            )
    for key, values in s.grid.items():
        if not values:
            raise UserError(f"sweep.grid.{key}: give at least one value")
    base = cfg.model_copy(update={"sweep": s.model_copy(update={"grid": {}, "variants": []})})
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*s.grid.values()):
        for variant in s.variants or [{}]:
            wanted = {**dict(zip(s.grid, combo)), **variant}
            tree = apply_overrides(base, wanted, "sweep override").resolved()
            canonical = {k: _get_path(tree, k) for k in sorted(wanted)}
            if canonical not in out:
                out.append(canonical)
    return out


def save_resolved(cfg: Config, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "config.yaml"
    out.write_text(yaml.safe_dump({**cfg.resolved(), "config_hash": cfg.hash}, sort_keys=False))
    return out


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set key=value``: every config-driven subcommand takes them."""
    p.add_argument("--config", help="YAML config (default: the packaged demo on digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
