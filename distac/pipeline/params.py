"""The pipeline's parameters (``params.yaml``), validated.

Every section forbids unknown keys, so a typo fails loudly, and a validation error names the field path
(``tasks.1.finetune.lr``). ``load_params(path)`` is the one entry point. The fine-tuning recipe and the
DisTaC settings are not retyped here: their fields, types, defaults and checks come from the library's
``FinetuneRecipe`` and ``DistacConfig`` (``dataclass_fields``), so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from distac.conditioning import DistacConfig
from distac.data.spec import DataSpec, UnlabeledSpec
from distac.diagnostics import CONFIDENCE_THRESHOLD, NORM_RATIO_THRESHOLD, TARGET_CONFIDENCE
from distac.errors import ConfigError, DistacError
from distac.evaluation import DEFAULT_ALPHA_GRID
from distac.merging import method_class
from distac.training import FinetuneRecipe

GLUE_TASKS = ("cola", "mrpc", "rte", "sst2")
VISION_PREFIX = "vision:"
IMAGE_FOLDER_PREFIX = "imagefolder:"
# A task name is also a folder name under the storage root and an argument in dvc.yaml's shell commands:
# it may only hold characters that are safe in both. Paths live in their own fields (data.vision_root).
PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
TORCHVISION_CLASS = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _task_name(name: str) -> str:
    """A GLUE task (canonical spelling: 'SST-2' → 'sst2'), ``vision:<torchvision class>``,
    ``imagefolder:<folder under data.vision_root>`` or any other ``[a-z0-9_-]+`` name."""
    glue = name.lower().replace("-", "").replace("_", "")
    if glue in GLUE_TASKS:
        return glue
    if name.startswith(VISION_PREFIX) and TORCHVISION_CLASS.fullmatch(name[len(VISION_PREFIX):]):
        return name
    if name.startswith(IMAGE_FOLDER_PREFIX) and PLAIN_NAME.fullmatch(name[len(IMAGE_FOLDER_PREFIX):]):
        return name
    if PLAIN_NAME.fullmatch(name) and name not in (".", ".."):
        return name  # a task of the user's own: TaskParams requires its `data`
    raise ValueError(f"invalid task name {name!r}: a task name may hold only a-z, 0-9, '_' and '-' "
                     f"(after the prefix 'vision:' a torchvision class name, after 'imagefolder:' a folder name "
                     f"under data.vision_root; paths belong in data.vision_root, not in the name)")


TaskName = Annotated[str, AfterValidator(_task_name)]

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    """A strict, immutable config section: unknown keys are errors, values are never coerced (``true`` is
    not the number 1, ``"4"`` not the integer 4; an integer is accepted where a float is expected), and
    floats must be finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelParams(Section):
    """What ``distac.models.build_adapter`` builds. ``name_or_path`` is the Hugging Face model id or directory
    (``hf_text``; 'minilm' is the bundled all-MiniLM-L6-v2; ``hf_seqcls``: θ_pre of imported
    sequence-classification checkpoints; ``hf_causal_lm``: θ_pre of causal LMs, tasks scored on their label
    words / completions; ``hf_clip``: a transformers CLIPModel) or the open_clip architecture
    (``open_clip``, e.g. 'ViT-B-32'); ``options`` holds the adapter's other arguments (open_clip:
    ``pretrained`` weights file, ``model_config``, ``templates``; hf_text: ``architecture``)."""

    kind: Literal["hf_text", "open_clip", "hf_seqcls", "hf_causal_lm", "hf_clip"] = "hf_text"
    name_or_path: str = "minilm"
    pooling: Literal["mean", "cls", "last"] = "mean"
    max_length: PositiveInt = 128
    options: dict[str, Any] = Field(default_factory=dict)

    def adapter_spec(self) -> dict[str, Any]:
        if self.kind == "open_clip":
            return {"kind": self.kind, "model_name": self.name_or_path, **self.options}
        if self.kind in ("hf_seqcls", "hf_causal_lm"):  # their own heads: no pooling choice (causal LM options:
            # template, separator, tokenizer; distac.models.causal_lm)
            return {"kind": self.kind, "name_or_path": self.name_or_path, "max_length": self.max_length, **self.options}
        if self.kind == "hf_clip":
            return {"kind": self.kind, "name_or_path": self.name_or_path, **self.options}
        return {"kind": self.kind, "name_or_path": self.name_or_path, "pooling": self.pooling,
                "max_length": self.max_length, **self.options}


class DataParams(Section):
    """Where the data lives and how much of each split to use."""

    glue_dir: str | None = Field(None, description="default: ../shared/data/glue beside the checkout")
    vision_root: str | None = Field(None, description="torchvision data root, for 'vision:' tasks")
    max_train: PositiveInt | None = None
    max_eval: PositiveInt | None = None
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    seed: int = 0


def _checked_by(config: type, name: str) -> AfterValidator:
    """Validate one field the way the library dataclass does (its ``__post_init__``), so a bad value is an
    error at that field's path, worded by the library."""
    def check(value: Any) -> Any:
        try:
            config(**{name: value})
        except DistacError as exc:
            raise ValueError(str(exc)) from None
        return value
    return AfterValidator(check)


def dataclass_fields(config: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pydantic field definitions for a library config dataclass: its fields, types and defaults, each
    checked by the dataclass itself."""
    hints = typing.get_type_hints(config)
    return {f.name: (Annotated[hints[f.name], _checked_by(config, f.name)], f.default)
            for f in dataclasses.fields(config) if f.name not in skip}


# The default recipe: ``distac.training.FinetuneRecipe``'s fields.
RecipeParams = create_model("RecipeParams", __base__=Section, __doc__=FinetuneRecipe.__doc__,
                            **dataclass_fields(FinetuneRecipe))


def _optional_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The model's fields, each optional (default None) but keeping its constraints."""
    def optional(field: Any) -> Any:
        kind = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        return kind | None

    return {name: (optional(field), None) for name, field in model.model_fields.items()}


# A task's overrides of the default recipe: the same fields and constraints, each optional.
RecipeOverride = create_model("RecipeOverride", __base__=Section, **_optional_fields(RecipeParams))


def is_builtin_task(name: str) -> bool:
    return name in GLUE_TASKS or name.startswith((VISION_PREFIX, IMAGE_FOLDER_PREFIX))


class TaskParams(Section):
    """One task to fine-tune and merge; ``finetune`` overrides the default recipe for it alone.

    ``data``: the task's files or dataset (``distac.data.DataSpec``; required for a name that is not a GLUE
    task, ``vision:`` or ``imagefolder:``). ``finetuned``: an existing fine-tuned model (any form
    ``distac.models.load_model`` takes) imported instead of fine-tuning. ``unlabeled``: what DisTaC
    conditions on instead of the task's training inputs (a file, or ``{from_task: other}``).
    """

    name: TaskName
    finetune: RecipeOverride = Field(default_factory=RecipeOverride)  # type: ignore[valid-type]
    data: Annotated[DataSpec, Field(strict=False)] | None = None
    finetuned: str | None = None
    unlabeled: Annotated[UnlabeledSpec, Field(strict=False)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unlabeled_shorthand(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("unlabeled"), str):
            values = {**values, "unlabeled": {"path": values["unlabeled"]}}
        return values

    @model_validator(mode="after")
    def _known_or_described(self) -> "TaskParams":
        if self.data is None and not is_builtin_task(self.name):
            raise ValueError(f"unknown task {self.name!r}: expected one of {', '.join(GLUE_TASKS)}, "
                             f"'vision:<torchvision class>' or 'imagefolder:<folder under data.vision_root>', "
                             "or give the task its `data:` (files or a dataset; docs/own-models.md)")
        if self.data is not None and self.data.unlabeled is not None:  # its own key: changing it re-runs DisTaC only
            raise ValueError("give `unlabeled` beside `data` in the task, not inside it")
        return self


class KappaParams(Section):
    """How DisTaC picks the norm scale κ_t: the diagnosis' recommendation (``recommended``: shrink only
    vectors flagged for norm disparity, see ``distac.diagnostics``), shrink to the smallest norm (``min``),
    a fixed κ (``explicit``, ``value`` = κ) or a fixed target norm (``target_norm``, ``value`` = the norm)."""

    policy: Literal["recommended", "min", "explicit", "target_norm"] = "min"
    value: PositiveFloat | None = None

    @model_validator(mode="after")
    def _value_matches_policy(self) -> "KappaParams":
        derived = self.policy in ("recommended", "min")
        if derived and self.value is not None:
            raise ValueError(f"value is not used with policy {self.policy!r}; remove it")
        if not derived and self.value is None:
            raise ValueError(f"policy {self.policy!r} needs a value")
        return self


class _ConditioningPolicy(Section):
    """DisTaC in the pipeline: which tasks, how κ is chosen, and T_stu possibly from the diagnosis. The
    other settings are ``distac.conditioning.DistacConfig``'s fields (added below)."""

    tasks: Literal["auto"] | list[TaskName] = "auto"
    kappa: KappaParams = Field(default_factory=KappaParams)
    student_temperature: PositiveFloat | Literal["auto"] = "auto"
    track_accuracy: bool = Field(False, description="validation accuracy at the anchor and every logged step "
                                                    "(convergence curves; one validation pass each)")


# ``tasks: auto`` conditions the tasks the diagnosis flags; ``student_temperature: auto`` takes each task's
# recommended sharpening temperature (1, i.e. norm only, unless it is flagged for low confidence).
ConditioningParams = create_model(
    "ConditioningParams", __base__=_ConditioningPolicy, __doc__=_ConditioningPolicy.__doc__,
    **dataclass_fields(DistacConfig, skip=("kappa", "target_norm", "student_temperature")))


class DiagnosisParams(Section):
    """Thresholds that flag a task for conditioning (see ``distac.diagnostics``): a norm more than
    ``norm_ratio`` times the smallest; a scaled confidence below ``min_scaled_confidence``."""

    norm_ratio: Annotated[float, Field(ge=1)] = NORM_RATIO_THRESHOLD
    min_scaled_confidence: Annotated[float, Field(gt=0, lt=1)] = CONFIDENCE_THRESHOLD
    target_confidence: Annotated[float, Field(gt=0, le=1)] = TARGET_CONFIDENCE

    @model_validator(mode="after")
    def _target_above_threshold(self) -> "DiagnosisParams":
        if self.target_confidence <= self.min_scaled_confidence:
            raise ValueError("target_confidence must exceed min_scaled_confidence")
        return self


class MethodParams(Section):
    """One merge method; ``alpha: search`` picks α from the grid on the validation split."""

    name: str
    alpha: PositiveFloat | Literal["search"] | None = None
    hyperparams: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_method(cls, name: str) -> str:
        try:
            method_class(name)
        except DistacError as exc:
            raise ValueError(str(exc)) from None
        return name

    @model_validator(mode="after")
    def _alpha_is_a_hyperparameter(self) -> "MethodParams":
        accepted = method_class(self.name).hyperparameters()
        if self.alpha is not None and not method_class(self.name).has_alpha:
            raise ValueError(f"{self.name} has no α; remove alpha")
        if "alpha" in self.hyperparams:
            raise ValueError("give alpha as the method's own 'alpha' field, not in hyperparams")
        unknown = sorted(set(self.hyperparams) - set(accepted))
        if unknown:
            raise ValueError(f"{self.name} has no hyperparameter {', '.join(unknown)}; "
                             f"it accepts: {', '.join(sorted(accepted)) or 'none'}")
        return self


VARIANTS = ("as-is", "distac")
"""A merge of the task vectors as fine-tuned, and one after DisTaC conditioning: the one name of each, in
folders, commands, reports and MLflow."""
Variant = Literal["as-is", "distac"]


class MergeParams(Section):
    """The methods to merge with; each is merged once per variant: the vectors as-is and after DisTaC.
    With ``conditioning.tasks: []`` (a baseline) the variants default to ``[as-is]``: a DisTaC merge would be
    the same merge again. With ``tasks: auto`` and no task flagged, the DisTaC merges are not computed either
    (``distac.pipeline.stages.merge``)."""

    methods: list[MethodParams] = Field(min_length=1)
    alpha_grid: list[PositiveFloat] = Field(default=list(DEFAULT_ALPHA_GRID), min_length=1)
    variants: list[Variant] = Field(default=list(VARIANTS), min_length=1)

    @field_validator("variants")
    @classmethod
    def _variants_in_order(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError("a variant is listed twice")
        return sorted(variants, key=VARIANTS.index)

    @field_validator("methods")
    @classmethod
    def _unique_names(cls, methods: list[MethodParams]) -> list[MethodParams]:
        names = [m.name for m in methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"merge method listed twice: {', '.join(duplicates)}")
        return methods

    def method(self, name: str) -> MethodParams:
        for method in self.methods:
            if method.name == name:
                return method
        raise ConfigError(f"merge.methods has no method {name!r}; configured: "
                          f"{', '.join(m.name for m in self.methods)}")


class StorageParams(Section):
    """Where stage outputs live: a local directory or ``s3://bucket/prefix``. ``reuse`` lists other roots
    (e.g. a sibling experiment's) whose finished stages are copied when their fingerprint matches, so a
    model shared by several experiments is trained once."""

    root: str = "runs"
    reuse: list[str] = Field(default_factory=list)

    @field_validator("root")
    @classmethod
    def _not_empty(cls, root: str) -> str:
        if not root.strip():
            raise ValueError("must not be empty")
        return root.rstrip("/")

    @field_validator("reuse")
    @classmethod
    def _clean_roots(cls, roots: list[str]) -> list[str]:
        return [root.rstrip("/") for root in roots if root.strip()]


TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class MlflowParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "distac"
    artifact_location: str | None = Field(None, description="default: ./mlruns beside the tracking store")

    @field_validator("tracking_uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = urlsplit(uri).scheme.split("+", 1)[0]
        if scheme not in TRACKING_SCHEMES and not (len(scheme) == 1 and os.name == "nt"):
            raise ValueError(f"unknown tracking URI scheme {scheme!r}; use one of "
                             f"{', '.join(s for s in TRACKING_SCHEMES if s)} or a local path")
        return uri


class DaskParams(Section):
    """A Dask cluster: an existing scheduler ``address``, or a LocalCluster of ``n_workers`` processes."""

    address: str | None = None
    n_workers: PositiveInt = 2
    threads_per_worker: PositiveInt = 1


class ExecutionParams(Section):
    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: PositiveInt = 2
    dask: DaskParams = Field(default_factory=DaskParams)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: PositiveInt | None = Field(None, description="torch.set_num_threads per process")


class PipelineParams(Section):
    """The whole ``params.yaml``."""

    model: ModelParams = Field(default_factory=ModelParams)
    data: DataParams = Field(default_factory=DataParams)
    finetune: RecipeParams = Field(default_factory=RecipeParams)
    tasks: list[TaskParams] = Field(min_length=2)
    diagnosis: DiagnosisParams = Field(default_factory=DiagnosisParams)
    conditioning: ConditioningParams = Field(default_factory=ConditioningParams)
    merge: MergeParams
    storage: StorageParams = Field(default_factory=StorageParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    execution: ExecutionParams = Field(default_factory=ExecutionParams)

    @model_validator(mode="before")
    @classmethod
    def _baseline_merges_as_is(cls, values: Any) -> Any:
        """Nothing to condition (``conditioning.tasks: []``): the variants default to as-is only."""
        if not isinstance(values, dict):
            return values
        conditioning, merge = values.get("conditioning"), values.get("merge")
        if isinstance(conditioning, dict) and conditioning.get("tasks") == [] and isinstance(merge, dict) \
                and "variants" not in merge:
            values = {**values, "merge": {**merge, "variants": ["as-is"]}}
        return values

    @model_validator(mode="after")
    def _tasks_consistent(self) -> "PipelineParams":
        names = self.task_names
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tasks: task listed twice: {', '.join(duplicates)}")
        if isinstance(self.conditioning.tasks, list):
            unknown = [t for t in self.conditioning.tasks if t not in names]
            if unknown:
                raise ValueError(f"conditioning.tasks: {', '.join(unknown)} not among tasks ({', '.join(names)})")
        if self.conditioning.tasks == [] and "distac" in self.merge.variants:
            raise ValueError("merge.variants: 'distac' merges the same vectors as 'as-is' when conditioning.tasks "
                             "is empty; list only as-is (the default when nothing is conditioned)")
        return self

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def method_names(self) -> list[str]:
        return [method.name for method in self.merge.methods]

    def task(self, name: str) -> TaskParams:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"tasks has no task {name!r}; configured: {', '.join(self.task_names)}")

    @model_validator(mode="after")
    def _surrogates_exist(self) -> "PipelineParams":
        names = self.task_names
        for task in self.tasks:
            unlabeled = task.unlabeled
            if unlabeled is not None and unlabeled.from_task is not None and unlabeled.from_task not in names:
                raise ValueError(f"tasks: {task.name}: unlabeled.from_task {unlabeled.from_task!r} is not among "
                                 f"tasks ({', '.join(names)})")
        return self

    def recipe(self, task: str) -> RecipeParams:
        """The default recipe with this task's overrides applied."""
        overrides = self.task(task).finetune.model_dump(exclude_none=True)
        return RecipeParams.model_validate({**self.finetune.model_dump(), **overrides})


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)


def parse_params(data: Any, source: str = "params") -> PipelineParams:
    """Validate an already-loaded mapping; raises ConfigError naming each bad field path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source} is invalid:\n{_format_errors(exc)}") from None


class _ParamsLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; params are strictly typed, so read it as the float a
    person means, as YAML 1.2 does."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_params(path: str | os.PathLike) -> PipelineParams:
    """Read and validate a params YAML file."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(data, source=str(path))
