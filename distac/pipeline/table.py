"""The stage table: one record per pipeline stage, and everything derived from it.

A stage's record names its folder (= its name), its scope (once, per task, or per merge method × variant),
its upstream stages, the params it depends on, the library modules its code uses, the files it writes and
the function that computes them. The storage layout, the fingerprints, ``distac stage``, the Prefect
tasks, the flow and ``dvc.yaml`` are all read off this table, so adding a stage means one entry here and
its function in ``distac.pipeline.stages``.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import distac
from distac.errors import ConfigError
from distac.pipeline.inputs import input_identities
from distac.pipeline.params import VARIANTS, PipelineParams

if TYPE_CHECKING:  # the stage functions import the whole library; the table only names them
    from distac.pipeline.runner import StageContext



class Scope(enum.Enum):
    GLOBAL = "global"  # one instance
    TASK = "task"  # one per task
    METHOD = "method"  # one per merge method × variant


@dataclass(frozen=True)
class Upstream:
    """An upstream stage; ``variants`` limits the dependency to those variants of a per-method stage."""

    stage: str
    variants: tuple[str, ...] = VARIANTS


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    ``params``: dotted keys into params.yaml the stage reads; ``{task}`` / ``{method}`` pick this instance's
    entry of a named list (``tasks.{task}``: that task's entry). ``modules``: the library modules whose code
    its outputs depend on (hashed into the fingerprint; DVC deps). ``isolated``: run in a child process by
    the flow (fine-tuning draws dropout masks from torch's process-wide RNG). ``metrics``: per-step metric
    prefix it reports while it runs. ``shown``: outputs DVC shows (a ``.json``: metrics; others: plots),
    kept out of its cache.
    """

    name: str
    scope: Scope
    help: str
    function: str  # the name of its function in distac.pipeline.stages
    upstream: tuple[Upstream, ...] = ()
    params: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    isolated: bool = False
    metrics: str = ""
    shown: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        return self.name

    def run(self, context: "StageContext") -> dict[str, Any]:
        return getattr(_stages_module(), self.function)(context)


def _stages_module():
    from distac.pipeline import stages

    return stages


def _up(*names: str, variants: tuple[str, ...] = VARIANTS) -> tuple[Upstream, ...]:
    return tuple(Upstream(name, variants) for name in names)


MODEL_CODE = ("distac.io", "distac.models")

STAGES: tuple[Stage, ...] = (
    Stage("pretrained", Scope.GLOBAL, "store θ_pre, the backbone every task vector is measured from",
          "pretrained", params=("model",), modules=MODEL_CODE, outputs=("model",)),
    # Users' own models: a task with `finetuned:` is imported here instead of trained (same outputs;
    # distac.pipeline.stages.import_finetuned), leaving everything downstream as is.
    Stage("finetune", Scope.TASK, "fine-tune one task with its recipe; validation/test accuracy",
          "finetune", _up("pretrained"),
          params=("data", "finetune", "tasks.{task}.finetune", "tasks.{task}.data", "tasks.{task}.finetuned"),
          modules=(*MODEL_CODE, "distac.data", "distac.training", "distac.evaluation", "distac.calibration"),
          outputs=("model", "metrics.json", "history.json", "validation_logits.safetensors"),
          isolated=True, metrics="train/"),
    Stage("extract", Scope.TASK, "the task vector τ_t = θ_t − θ_pre over the shared backbone",
          "extract", _up("pretrained", "finetune"), modules=(*MODEL_CODE, "distac.vectors"),
          outputs=("task_vector.safetensors", "stats.json")),
    Stage("diagnose", Scope.GLOBAL, "norm and confidence diagnostics; which tasks DisTaC conditions",
          "diagnose", _up("finetune", "extract"), params=("diagnosis", "conditioning.tasks"),
          modules=("distac.io", "distac.vectors", "distac.diagnostics", "distac.calibration"),
          outputs=("diagnosis.json", "diagnosis.md")),
    Stage("condition", Scope.TASK, "DisTaC on one task if the diagnosis selected it",
          "condition", _up("pretrained", "finetune", "extract", "diagnose"),
          params=("data", "conditioning", "tasks.{task}.unlabeled"),
          modules=(*MODEL_CODE, "distac.data", "distac.vectors", "distac.conditioning", "distac.evaluation"),
          outputs=("summary.json", "history.json", "task_vector.safetensors"), metrics="distac/"),
    Stage("merge", Scope.METHOD, "merge every task vector with one method; α fixed or searched",
          "merge", (*_up("pretrained", "finetune", "extract"), *_up("condition", variants=("distac",))),
          params=("merge.methods.{method}", "merge.alpha_grid"),
          modules=(*MODEL_CODE, "distac.data", "distac.vectors", "distac.merging", "distac.evaluation"),
          outputs=("merged",), metrics="alpha_search/"),
    Stage("evaluate", Scope.METHOD, "test accuracy of the merged model on every task, absolute and normalized",
          "evaluate", _up("pretrained", "finetune", "merge"),
          modules=(*MODEL_CODE, "distac.data", "distac.vectors", "distac.merging", "distac.evaluation"),
          outputs=("evaluation.json",)),
    Stage("report", Scope.GLOBAL, "the results table, CSV, plot and metrics",
          "report", _up("finetune", "evaluate"), modules=("distac.io", "distac.pipeline.report"),
          outputs=("results.md", "results.csv", "results.png", "plot.csv", "metrics.json"),
          shown=("metrics.json", "plot.csv", "results.png")),
)

TABLE: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The stage record; ConfigError naming the known stages."""
    try:
        return TABLE[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(TABLE)}") from None


# --------------------------------------------------------------------------------------------- instances


@dataclass(frozen=True, order=True)
class StageRef:
    """One instance of a stage: the stage plus its task, or its method and variant."""

    stage: str
    task: str | None = None
    method: str | None = None
    variant: str | None = None

    @property
    def key(self) -> str:
        """Its readable id and its folder under the storage root: 'finetune/cola', 'merge/ties/distac'."""
        return "/".join(p for p in (self.stage, self.task, self.method, self.variant) if p)

    @property
    def record(self) -> Stage:
        return stage(self.stage)


_SAFE_PART = re.compile(r"^[A-Za-z0-9_.:-]+$")


def ref(params: PipelineParams, name: str, task: str | None = None, method: str | None = None,
        variant: str | None = None) -> StageRef:
    """A checked stage instance: the task/method it needs, configured, and nothing it does not take."""
    record = stage(name)
    if record.scope is Scope.TASK:
        if task is None:
            raise ConfigError(f"stage {name} needs a task (--task)")
        task = params.task(task).name
    elif task is not None:
        raise ConfigError(f"stage {name} takes no task")
    if record.scope is Scope.METHOD:
        if method is None:
            raise ConfigError(f"stage {name} needs a merge method (--method)")
        method = params.merge.method(method).name
        variant = variant or VARIANTS[0]
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    elif method is not None or variant is not None:
        raise ConfigError(f"stage {name} takes no method or variant")
    made = StageRef(name, task, method, variant)
    if not all(_SAFE_PART.match(part) and part not in (".", "..") for part in made.key.split("/")):
        raise ConfigError(f"stage {made.key!r}: a task or method name would leave the storage root")
    return made


def instances(params: PipelineParams, name: str) -> list[StageRef]:
    """Every instance of one stage under these params."""
    record = stage(name)
    if record.scope is Scope.TASK:
        return [StageRef(name, task=t) for t in params.task_names]
    if record.scope is Scope.METHOD:
        return [StageRef(name, method=m, variant=v) for m in params.method_names for v in params.merge.variants]
    return [StageRef(name)]


def all_instances(params: PipelineParams) -> list[StageRef]:
    """Every stage instance, upstream stages before the stages that read them."""
    return [made for record in STAGES for made in instances(params, record.name)]


def upstream_of(params: PipelineParams, made: StageRef) -> list[StageRef]:
    """The instances this one reads: the same task / method-variant where the scopes match, else all."""
    out: list[StageRef] = []
    for dependency in made.record.upstream:
        if made.variant is not None and made.variant not in dependency.variants:
            continue
        upstream = stage(dependency.stage)
        if upstream.scope is Scope.TASK and made.task is not None:
            out.append(StageRef(upstream.name, task=made.task))
        elif upstream.scope is Scope.METHOD and made.method is not None:
            out.append(StageRef(upstream.name, method=made.method, variant=made.variant))
        else:
            out += [u for u in instances(params, upstream.name)
                    if u.variant is None or u.variant in dependency.variants]
    return out


# --------------------------------------------------------------------------------------------- fingerprints


def param_values(params: PipelineParams, made: StageRef) -> dict[str, Any]:
    """The values of the params a stage instance depends on, by dotted key ('tasks.mrpc': that task's entry)."""
    data = params.model_dump(mode="json")
    values = {}
    for key in made.record.params:
        key = key.format(task=made.task, method=made.method)
        value: Any = data
        for part in key.split("."):
            if isinstance(value, list):  # a named list (tasks, merge.methods): pick the entry by name
                value = next(item for item in value if item.get("name") == part)
            else:
                value = value[part]
        values[key] = value
    return values


def module_files(module: str) -> list[Path]:
    """The source files of a library module (a package: all of its ``.py`` files)."""
    root = Path(distac.__file__).parent.parent
    path = root.joinpath(*module.split("."))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    return [path.with_suffix(".py")]


@functools.lru_cache(maxsize=None)
def code_hash(name: str) -> str:
    """A hash of the code a stage's outputs depend on: the package version, the source of the modules
    the stage lists and of its own function. Editing any of them re-runs exactly the stages that use it."""
    record = stage(name)
    digest = hashlib.sha256(f"distac {distac.__version__}\n".encode())
    root = Path(distac.__file__).parent.parent
    for module in sorted(set(record.modules)):
        for path in module_files(module):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(inspect.getsource(getattr(_stages_module(), record.function)).encode())
    return digest.hexdigest()[:16]


def fingerprint(params: PipelineParams, made: StageRef) -> str:
    """A hash of everything the instance's outputs depend on: its params, its upstream fingerprints, its
    code and the content of the user's files its params name (``distac.pipeline.inputs``)."""
    return _fingerprint(params, made, {})


def _fingerprint(params: PipelineParams, made: StageRef, memo: dict[StageRef, str]) -> str:
    if made not in memo:
        upstream = {u.key: _fingerprint(params, u, memo) for u in upstream_of(params, made)}
        values = param_values(params, made)
        parts = {"stage": made.key, "params": values, "upstream": upstream, "code": code_hash(made.stage)}
        inputs = input_identities({key: value for key, value in values.items() if key.startswith("tasks.")})
        if inputs:  # users' data files and imported models: their content, not only their paths
            parts["inputs"] = inputs
        text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
        memo[made] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return memo[made]


@dataclass
class Plan:
    """Every instance with its upstream instances and fingerprint, computed once for a run."""

    params: PipelineParams
    refs: list[StageRef] = field(default_factory=list)
    upstream: dict[StageRef, list[StageRef]] = field(default_factory=dict)
    fingerprints: dict[StageRef, str] = field(default_factory=dict)

    @classmethod
    def of(cls, params: PipelineParams) -> "Plan":
        plan = cls(params, all_instances(params))
        memo: dict[StageRef, str] = {}
        for made in plan.refs:
            plan.upstream[made] = upstream_of(params, made)
            plan.fingerprints[made] = _fingerprint(params, made, memo)
        return plan

    def __iter__(self) -> Iterator[StageRef]:
        return iter(self.refs)


StageFunction = Callable[["StageContext"], dict[str, Any]]
