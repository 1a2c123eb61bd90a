"""The pipeline's stages: one function per stage, each reading its inputs from the storage root and writing
its outputs there atomically.

Layout under ``params.storage.root`` (a local directory or ``s3://bucket/prefix``)::

    pretrained/                      θ_pre (backbone)
    finetune/<task>/                 fine-tuned model (backbone/, head.safetensors, meta.json), metrics.json
    vectors/<task>/                  task_vector.safetensors, stats.json
    diagnosis/                       diagnosis.json (incl. the tasks to condition), diagnosis.md
    conditioned/<task>/              task_vector.safetensors (only if conditioned), summary.json
    merged/<method>/<variant>/       vector.safetensors or served/<task>.safetensors, merge.json
    evaluation/<method>/<variant>/   evaluation.json        (variant: as-is or distac)
    report/                          results.md, results.csv, results.png, plot.csv, metrics.json

Each stage directory ends with ``_done.json``, written last, holding the stage's fingerprint: a hash of
its parameters and of its upstream stages' fingerprints. A stage whose manifest matches is skipped, so an
interrupted run resumes where it stopped and a re-run with nothing changed does no work. The manifest is
deleted before a stage starts, so a half-rewritten stage directory never looks finished.

This module is plain library code (no Prefect, MLflow or DVC): the Prefect tasks, the ``distac stage``
command and DVC all call these functions.
"""

from __future__ import annotations

import csv
import io as stdio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distac import io
from distac.config import PipelineParams, fingerprint
from distac.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

MetricsCallback = Callable[[int, dict[str, float]], None]
STAGES = ("pretrained", "finetune", "extract", "diagnose", "condition", "merge", "evaluate", "report")
MANIFEST = "_done.json"
VECTOR_FILE = "task_vector.safetensors"
LOGITS_FILE = "validation_logits.safetensors"
EVAL_BATCH_SIZE = 64


@dataclass
class StageResult:
    """What a stage did: where its outputs are, whether it was skipped, and a JSON-able summary."""

    stage: str
    key: str
    uri: str
    fingerprint: str
    skipped: bool
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- layout


VARIANTS = ("as-is", "distac")


def variant_name(conditioned: bool) -> str:
    """``as-is`` or ``distac`` (after DisTaC conditioning): the sub-directory of a merge or evaluation."""
    return VARIANTS[int(conditioned)]


def merged_variants(params: PipelineParams) -> list[bool]:
    """The configured variants as ``conditioned`` flags: False for as-is, True for DisTaC."""
    return [variant == "distac" for variant in params.merge.variants]


def stage_key(stage: str, task: str | None = None, method: str | None = None, conditioned: bool = False) -> str:
    """A readable stage id: 'report', 'finetune/cola', 'merge/ties/distac'."""
    parts = [stage, *([task] if task else []), *([method, variant_name(conditioned)] if method else [])]
    return "/".join(parts)


def stage_dir(params: PipelineParams, stage: str, task: str | None = None, method: str | None = None,
              conditioned: bool = False) -> str:
    root = params.storage.root
    if stage == "pretrained":
        return io.join_uri(root, "pretrained")
    if stage in ("finetune", "extract", "condition"):
        folder = {"finetune": "finetune", "extract": "vectors", "condition": "conditioned"}[stage]
        return io.join_uri(root, folder, _known_task(params, task))
    if stage == "diagnose":
        return io.join_uri(root, "diagnosis")
    if stage in ("merge", "evaluate"):
        folder = "merged" if stage == "merge" else "evaluation"
        return io.join_uri(root, folder, _known_method(params, method), variant_name(conditioned))
    if stage == "report":
        return io.join_uri(root, "report")
    raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def _known_task(params: PipelineParams, task: str | None) -> str:
    if task is None:
        raise ConfigError("this stage needs a task (--task)")
    return params.task(task).name


def _known_method(params: PipelineParams, method: str | None) -> str:
    if method is None:
        raise ConfigError("this stage needs a merge method (--method)")
    return params.merge.method(method).name


# --------------------------------------------------------------------------------------------- fingerprints


def stage_fingerprint(params: PipelineParams, stage: str, task: str | None = None, method: str | None = None,
                      conditioned: bool = False) -> str:
    """A hash of everything a stage's outputs depend on: its parameters and its upstream fingerprints."""
    fp = stage_fingerprint
    tasks = params.task_names
    if stage == "pretrained":
        return fingerprint(stage, params.model)
    if stage == "finetune":
        return fingerprint(stage, _known_task(params, task), fp(params, "pretrained"), params.data,
                           params.recipe(task))
    if stage == "extract":
        return fingerprint(stage, fp(params, "finetune", task))
    if stage == "diagnose":
        return fingerprint(stage, [fp(params, "extract", t) for t in tasks], params.diagnosis,
                           params.conditioning.tasks)
    if stage == "condition":
        return fingerprint(stage, _known_task(params, task), fp(params, "diagnose"), params.conditioning)
    if stage == "merge":
        method_params = params.merge.method(_known_method(params, method))
        upstream = [fp(params, "condition" if conditioned else "extract", t) for t in tasks]
        grid = params.merge.alpha_grid if method_params.alpha == "search" else None
        return fingerprint(stage, method_params, conditioned, upstream, grid)
    if stage == "evaluate":
        return fingerprint(stage, fp(params, "merge", method=method, conditioned=conditioned))
    if stage == "report":
        return fingerprint(stage, [fp(params, "evaluate", method=m, conditioned=c)
                                   for m in params.method_names for c in merged_variants(params)])
    raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The stage's ``_done.json`` or None when it has not finished."""
    fs, path = io.url_to_fs(io.join_uri(uri, MANIFEST))
    try:
        return io.read_json(io.join_uri(uri, MANIFEST)) if fs.exists(path) else None
    except CheckpointError:
        return None


def is_done(params: PipelineParams, stage: str, **where: Any) -> bool:
    """Whether the stage finished with exactly the current inputs and parameters."""
    manifest = read_manifest(stage_dir(params, stage, **where))
    return manifest is not None and manifest.get("fingerprint") == stage_fingerprint(params, stage, **where)


def _run(params: PipelineParams, stage: str, work: Callable[[str], dict[str, Any]], *, force: bool = False,
         **where: Any) -> StageResult:
    """Skip the stage if its manifest matches; otherwise clear the manifest, do the work, write it."""
    uri = stage_dir(params, stage, **where)
    key = stage_key(stage, **where)
    expected = stage_fingerprint(params, stage, **where)
    manifest = read_manifest(uri)
    if not force and manifest is not None and manifest.get("fingerprint") == expected:
        log.info("%s: up to date, skipped", key)
        return StageResult(stage, key, uri, expected, True, manifest.get("summary", {}))
    fs, path = io.url_to_fs(io.join_uri(uri, MANIFEST))
    if manifest is not None:
        fs.rm(path)
    reused = None if force else _reuse(params, uri, expected)
    if reused is not None:
        log.info("%s: reused from %s", key, reused["source"])
        return StageResult(stage, key, uri, expected, True, reused["manifest"].get("summary", {}))
    log.info("%s: running", key)
    started = time.perf_counter()
    summary = work(uri)
    seconds = time.perf_counter() - started
    io.write_json({"stage": stage, "key": key, "fingerprint": expected, "seconds": round(seconds, 3),
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary},
                  io.join_uri(uri, MANIFEST))
    log.info("%s: done in %.1f s", key, seconds)
    return StageResult(stage, key, uri, expected, False, summary, seconds)


def _reuse(params: PipelineParams, uri: str, expected: str) -> dict[str, Any] | None:
    """Copy the same stage from a ``storage.reuse`` root whose manifest has the expected fingerprint."""
    relative = uri[len(params.storage.root):].lstrip("/")
    for root in params.storage.reuse:
        source = io.join_uri(root, relative)
        manifest = read_manifest(source)
        if manifest is None or manifest.get("fingerprint") != expected:
            continue
        _copy_stage_dir(source, uri)
        return {"source": source, "manifest": manifest}
    return None


def reuse_finished(params: PipelineParams, stage: str, **where: Any) -> bool:
    """Copy the stage from a ``storage.reuse`` root if one finished it with the same fingerprint."""
    uri = stage_dir(params, stage, **where)
    return _reuse(params, uri, stage_fingerprint(params, stage, **where)) is not None


def _copy_stage_dir(source: str, target: str) -> None:
    """Copy a finished stage directory, its manifest last, so a crash mid-copy leaves it unfinished."""
    source_fs, source_path = io.url_to_fs(source)
    files = [f for f in source_fs.find(source_path) if not f.endswith("/" + MANIFEST)]
    for file in files:
        relative = file[len(source_path.rstrip("/")):].lstrip("/")
        with source_fs.open(file, "rb") as handle:
            io.write_bytes_atomic(handle.read(), io.join_uri(target, relative))
    with source_fs.open(source_path.rstrip("/") + "/" + MANIFEST, "rb") as handle:
        io.write_bytes_atomic(handle.read(), io.join_uri(target, MANIFEST))


# --------------------------------------------------------------------------------------------- helpers


def resolve_device(params: PipelineParams) -> torch.device:
    wanted = params.execution.device
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("execution.device is 'cuda' but no CUDA device is available")
    return torch.device(wanted)


def _setup(params: PipelineParams) -> None:
    if params.execution.torch_threads:
        torch.set_num_threads(params.execution.torch_threads)


def _adapter(params: PipelineParams):
    from distac.models import build_adapter

    return build_adapter(params.model.adapter_spec())


def _task_data(params: PipelineParams, task: str):
    from distac.data import load_task

    data = params.data
    root = data.vision_root if task.startswith(("vision:", "imagefolder:")) else data.glue_dir
    return load_task(task, root=root, max_train=data.max_train, max_eval=data.max_eval,
                     validation_fraction=data.validation_fraction, seed=data.seed)


def _pretrained_backbone(params: PipelineParams) -> dict[str, torch.Tensor]:
    from distac.models.store import backbone_uri

    return io.load_state_dict(backbone_uri(stage_dir(params, "pretrained")))


def _load_vector(params: PipelineParams, task: str, conditioned: bool):
    """The task's vector: the DisTaC-conditioned one when asked for and the task was conditioned."""
    from distac.vectors import TaskVector

    if conditioned and task in conditioned_tasks(params):
        return TaskVector.load(io.join_uri(stage_dir(params, "condition", task=task), VECTOR_FILE))
    return TaskVector.load(io.join_uri(stage_dir(params, "extract", task=task), VECTOR_FILE))


def read_json(uri: str, name: str) -> Any:
    return io.read_json(io.join_uri(uri, name))


def _finetuned_accuracy(params: PipelineParams, split: str) -> dict[str, float]:
    return {t: read_json(stage_dir(params, "finetune", task=t), "metrics.json")[f"{split}_accuracy"]
            for t in params.task_names}


def _evaluate(model, examples, adapter, device: torch.device) -> tuple[float, torch.Tensor]:
    from distac.evaluation import accuracy, labels_of, predict_logits

    logits = predict_logits(model.to(device), examples, adapter.collate, batch_size=EVAL_BATCH_SIZE)
    return accuracy(logits, labels_of(examples)), logits


# --------------------------------------------------------------------------------------------- stages


def pretrained(params: PipelineParams, *, force: bool = False) -> StageResult:
    """Store θ_pre, the backbone every task vector is measured from."""
    def work(uri: str) -> dict[str, Any]:
        from distac.models.store import save_pretrained

        _setup(params)
        adapter = _adapter(params)
        save_pretrained(adapter, uri)
        state = adapter.pretrained_backbone_state()
        return {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())}

    return _run(params, "pretrained", work, force=force)


def finetune(params: PipelineParams, task: str, *, on_step: MetricsCallback | None = None,
             progress: bool = True, force: bool = False) -> StageResult:
    """Fine-tune the pretrained model on one task with its recipe; record its validation/test accuracy."""
    def work(uri: str) -> dict[str, Any]:
        from distac.calibration import confidence_stats
        from distac.evaluation import labels_of
        from distac.models.store import save_task_model
        from distac.training import FinetuneRecipe
        from distac.training import finetune as run_finetune

        _setup(params)
        adapter, data, recipe = _adapter(params), _task_data(params, task), params.recipe(task)
        device = resolve_device(params)
        result = run_finetune(adapter, data, FinetuneRecipe(**recipe.model_dump()), progress=progress,
                              on_step=on_step)
        model = result.model.to(device)
        val_acc, val_logits = _evaluate(model, data.validation, adapter, device)
        test_acc, _ = _evaluate(model, data.test, adapter, device)
        metrics = {"validation_accuracy": val_acc, "test_accuracy": test_acc,
                   "validation_mean_max_prob": confidence_stats(val_logits).mean_max_prob,
                   "train_examples": len(data.train), "final_loss": result.history[-1]["loss"]}
        save_task_model(io.join_uri(uri, "model"), model.cpu(), adapter, task, data.num_classes,
                        list(data.class_names), extra={"recipe": recipe.model_dump(), **metrics})
        io.save_state_dict({"logits": val_logits, "labels": labels_of(data.validation)},
                           io.join_uri(uri, LOGITS_FILE))
        io.write_json(metrics, io.join_uri(uri, "metrics.json"))
        io.write_json(_jsonable(result.history), io.join_uri(uri, "history.json"))
        return metrics

    return _run(params, "finetune", work, task=task, force=force)


def extract(params: PipelineParams, task: str, *, force: bool = False) -> StageResult:
    """τ_t = θ_t − θ_pre over the shared backbone."""
    def work(uri: str) -> dict[str, Any]:
        from distac.models.store import backbone_uri
        from distac.vectors import TaskVector

        vector = TaskVector.from_checkpoints(backbone_uri(stage_dir(params, "pretrained")),
                                             backbone_uri(io.join_uri(stage_dir(params, "finetune", task=task),
                                                                      "model")))
        vector.save(io.join_uri(uri, VECTOR_FILE))
        stats = {"norm": vector.norm(), "tensors": len(vector),
                 "parameters": sum(t.numel() for t in vector.values())}
        io.write_json(stats, io.join_uri(uri, "stats.json"))
        return stats

    return _run(params, "extract", work, task=task, force=force)


def diagnose(params: PipelineParams, *, force: bool = False) -> StageResult:
    """Norm and confidence diagnostics of the source models; decides which tasks DisTaC conditions and with
    which recommended κ and temperatures."""
    def work(uri: str) -> dict[str, Any]:
        from distac.diagnostics import diagnose as run_diagnose
        from distac.vectors import TaskVector

        tasks = params.task_names
        vectors = {t: TaskVector.load(io.join_uri(stage_dir(params, "extract", task=t), VECTOR_FILE))
                   for t in tasks}
        logits = {t: io.load_state_dict(io.join_uri(stage_dir(params, "finetune", task=t), LOGITS_FILE))
                  for t in tasks}
        settings = params.diagnosis
        diagnosis = run_diagnose(vectors, {t: logits[t]["logits"] for t in tasks},
                                 {t: (logits[t]["logits"], logits[t]["labels"]) for t in tasks},
                                 norm_ratio_threshold=settings.norm_ratio,
                                 confidence_threshold=settings.min_scaled_confidence,
                                 target_confidence=settings.target_confidence)
        configured = params.conditioning.tasks
        recommended = [r.task for r in diagnosis.recommendations if r.condition]
        selected = [t for t in tasks if t in (recommended if configured == "auto" else configured)]
        io.write_json({**diagnosis.to_dict(), "conditioned_tasks": selected}, io.join_uri(uri, "diagnosis.json"))
        io.write_bytes_atomic(diagnosis.to_markdown().encode(), io.join_uri(uri, "diagnosis.md"))
        return {"conditioned_tasks": selected, "flags": diagnosis.flags,
                "norms": {t.name: t.norm for t in diagnosis.tasks}}

    return _run(params, "diagnose", work, force=force)


def conditioned_tasks(params: PipelineParams) -> list[str]:
    """The tasks the finished diagnose stage selected for DisTaC."""
    return read_json(stage_dir(params, "diagnose"), "diagnosis.json")["conditioned_tasks"]


def _distac_config(params: PipelineParams, task: str):
    """The DisTaC config for one task: κ from the policy, T_stu from the diagnosis when 'auto'."""
    from distac.conditioning import DistacConfig

    cfg = params.conditioning
    diagnosis = read_json(stage_dir(params, "diagnose"), "diagnosis.json")
    if cfg.kappa.policy == "explicit":
        kappa = {"kappa": cfg.kappa.value}
    elif cfg.kappa.policy == "target_norm":
        kappa = {"target_norm": cfg.kappa.value}
    else:
        kappa = {"target_norm": min(t["norm"] for t in diagnosis["tasks"])}
    student_temperature = cfg.student_temperature
    if student_temperature == "auto":
        recommendation = next(r for r in diagnosis["recommendations"] if r["task"] == task)
        student_temperature = cfg.teacher_temperature * recommendation["student_temperature"]
    return DistacConfig(**kappa, teacher_temperature=cfg.teacher_temperature,
                        student_temperature=student_temperature, beta=cfg.beta, lr=cfg.lr, steps=cfg.steps,
                        batch_size=cfg.batch_size, grad_clip=cfg.grad_clip, num_unlabeled=cfg.num_unlabeled,
                        log_every=cfg.log_every, seed=cfg.seed)


def condition(params: PipelineParams, task: str, *, on_log: MetricsCallback | None = None,
              progress: bool = True, force: bool = False) -> StageResult:
    """DisTaC on one task if the diagnosis selected it; otherwise record that it is served as-is."""
    def work(uri: str) -> dict[str, Any]:
        if task not in conditioned_tasks(params):
            summary = {"conditioned": False}
            io.write_json(summary, io.join_uri(uri, "summary.json"))
            return summary
        from distac.conditioning import condition as run_condition
        from distac.models.store import load_task_model
        from distac.vectors import TaskVector

        _setup(params)
        cfg, config = params.conditioning, _distac_config(params, task)
        loaded = load_task_model(io.join_uri(stage_dir(params, "finetune", task=task), "model"))
        device = resolve_device(params)
        data = _task_data(params, task)
        vector = TaskVector.load(io.join_uri(stage_dir(params, "extract", task=task), VECTOR_FILE))
        probe = None
        if cfg.track_accuracy:
            def probe(model):
                return {"validation_accuracy": _evaluate(model, data.validation, loaded.adapter, device)[0]}
        result = run_condition(loaded.model.to(device), _pretrained_backbone(params), vector,
                               data.unlabeled(cfg.num_unlabeled, cfg.seed), loaded.adapter.collate, config,
                               progress=progress, on_log=on_log, probe=probe)
        val_acc, _ = _evaluate(loaded.model, data.validation, loaded.adapter, device)
        result.vector.save(io.join_uri(uri, VECTOR_FILE))
        details = result.to_dict()
        io.write_json(_jsonable(details.pop("history")), io.join_uri(uri, "history.json"))
        summary = {"conditioned": True, "kappa": result.kappa, "original_norm": result.original_norm,
                   "final_norm": result.final_norm, "validation_accuracy": val_acc}
        io.write_json({**summary, **_jsonable(details)}, io.join_uri(uri, "summary.json"))
        return summary

    return _run(params, "condition", work, task=task, force=force)


def _heads_and_tasks(params: PipelineParams) -> tuple[list[dict[str, torch.Tensor]], list[Any]]:
    from distac.models.store import load_head

    heads = [load_head(io.join_uri(stage_dir(params, "finetune", task=t), "model")) for t in params.task_names]
    return heads, [_task_data(params, t) for t in params.task_names]


def merge(params: PipelineParams, method: str, conditioned: bool = False, *, progress: bool = True,
          force: bool = False) -> StageResult:
    """Merge every task's vector (DisTaC-conditioned ones when ``conditioned``) with one method; α fixed or
    searched on the validation split."""
    def work(uri: str) -> dict[str, Any]:
        from distac.evaluation import search_alpha
        from distac.merging import merge as run_merge

        _setup(params)
        method_params = params.merge.method(method)
        device = resolve_device(params)
        vectors = [_load_vector(params, t, conditioned) for t in params.task_names]
        search = None
        if method_params.alpha == "search":
            heads, tasks = _heads_and_tasks(params)
            search = search_alpha(method, vectors, _adapter(params), _pretrained_backbone(params), heads, tasks,
                                  grid=params.merge.alpha_grid, hyperparams=method_params.hyperparams,
                                  batch_size=EVAL_BATCH_SIZE, device=device, progress=progress)
            merged, alpha = search.merged, search.alpha
        else:
            alpha = method_params.alpha
            options = dict(method_params.hyperparams, **({"alpha": alpha} if alpha is not None else {}))
            merged = run_merge(method, vectors, device=device, progress=progress, **options)
        served = _save_merged(merged, params.task_names, uri)
        info = {"method": method, "conditioned": conditioned, "alpha": alpha, "served": served,
                "hyperparams": method_params.hyperparams, "info": _jsonable(merged.info),
                "alpha_search": search.to_dict() if search else None}
        io.write_json(info, io.join_uri(uri, "merge.json"))
        return {"alpha": alpha, "merged_norm": merged.vector.norm()}

    return _run(params, "merge", work, method=method, conditioned=conditioned, force=force)


def _save_merged(merged, tasks: list[str], uri: str) -> dict[str, str]:
    """Save what each task is served with; one shared file unless the method is per-task (EMR)."""
    if merged.masks is None:
        merged.vector.save(io.join_uri(uri, "vector.safetensors"))
        return {task: "vector.safetensors" for task in tasks}
    served = {}
    for i, task in enumerate(tasks):
        served[task] = f"served/{task}.safetensors"
        merged.for_task(i).save(io.join_uri(uri, served[task]))
    return served


def evaluate(params: PipelineParams, method: str, conditioned: bool = False, *,
             force: bool = False) -> StageResult:
    """Test accuracy of the merged model on every task, absolute and normalized by the fine-tuned model."""
    def work(uri: str) -> dict[str, Any]:
        from distac.evaluation import evaluate_task
        from distac.vectors import TaskVector

        _setup(params)
        merged_uri = stage_dir(params, "merge", method=method, conditioned=conditioned)
        info = read_json(merged_uri, "merge.json")
        adapter, device = _adapter(params), resolve_device(params)
        pretrained_state = _pretrained_backbone(params)
        finetuned = _finetuned_accuracy(params, "test")
        heads, tasks = _heads_and_tasks(params)
        rows = []
        for name, head, data in zip(params.task_names, heads, tasks):
            model = adapter.build(data.num_classes, data.class_names)
            model.load_head(head)
            vector = TaskVector.load(io.join_uri(merged_uri, info["served"][name]))
            model.load_backbone(vector.apply_to(pretrained_state))
            rows.append(evaluate_task(model.to(device), data.test, adapter.collate, task=name,
                                      batch_size=EVAL_BATCH_SIZE, finetuned_accuracy=finetuned[name]))
        result = {"method": method, "conditioned": conditioned, "alpha": info["alpha"],
                  "mean_accuracy": sum(r.accuracy for r in rows) / len(rows),
                  "mean_normalized_accuracy": sum(r.normalized_accuracy for r in rows) / len(rows),
                  "tasks": {r.task: r.to_dict() for r in rows}}
        io.write_json(result, io.join_uri(uri, "evaluation.json"))
        return {k: result[k] for k in ("alpha", "mean_accuracy", "mean_normalized_accuracy")}

    return _run(params, "evaluate", work, method=method, conditioned=conditioned, force=force)


# --------------------------------------------------------------------------------------------- report


def results_rows(params: PipelineParams) -> list[dict[str, Any]]:
    """One row per merged model (each method as-is and with DisTaC) plus the fine-tuned models: the
    absolute and normalized test accuracy per task and their means, in percent."""
    tasks = params.task_names
    finetuned = _finetuned_accuracy(params, "test")
    rows = [{"method": "individual", "variant": "fine-tuned", "alpha": None,
             **{f"{t}_abs": 100 * finetuned[t] for t in tasks}, **{f"{t}_norm": 100.0 for t in tasks},
             "mean_abs": 100 * sum(finetuned.values()) / len(tasks), "mean_norm": 100.0}]
    for method in params.method_names:
        for conditioned in merged_variants(params):
            result = read_json(stage_dir(params, "evaluate", method=method, conditioned=conditioned),
                               "evaluation.json")
            per_task = result["tasks"]
            rows.append({"method": method, "variant": "DisTaC" if conditioned else "as-is",
                         "alpha": result["alpha"],
                         **{f"{t}_abs": 100 * per_task[t]["accuracy"] for t in tasks},
                         **{f"{t}_norm": 100 * per_task[t]["normalized_accuracy"] for t in tasks},
                         "mean_abs": 100 * result["mean_accuracy"],
                         "mean_norm": 100 * result["mean_normalized_accuracy"]})
    return rows


def results_markdown(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    """The paper's layout: per task 'absolute (normalized)', then the means; as-is and DisTaC rows."""
    def cell(value: Any) -> str:
        return "–" if value is None else f"{value:.1f}"

    header = ["Method", "Variant", "α", *tasks, "Avg. abs.", "Avg. norm."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        alpha = "–" if row["alpha"] is None else f"{row['alpha']:g}"
        cells = [f"{cell(row[f'{t}_abs'])} ({cell(row[f'{t}_norm'])})" for t in tasks]
        lines.append("| " + " | ".join([row["method"], row["variant"], alpha, *cells, cell(row["mean_abs"]),
                                        cell(row["mean_norm"])]) + " |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = stdio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _plot_png(rows: list[dict[str, Any]]) -> bytes:
    """Mean normalized accuracy per method, as-is vs DisTaC, as a grouped bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "individual"))
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["method"] != "individual"))
    value = {(r["method"], r["variant"]): r["mean_norm"] for r in rows}
    positions = range(len(methods))
    width = 0.8 / len(variants)
    figure, axis = plt.subplots(figsize=(1.6 * len(methods) + 2, 3.5))
    for i, variant in enumerate(variants):
        offset = (i - (len(variants) - 1) / 2) * width
        axis.bar([p + offset for p in positions], [value[(m, variant)] for m in methods], width, label=variant)
    axis.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    axis.set_xticks(list(positions), methods)
    axis.set_ylabel("mean normalized accuracy (%)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def report(params: PipelineParams, *, force: bool = False) -> StageResult:
    """The results table (markdown + CSV), a PNG plot, DVC plot data and a metrics JSON."""
    def work(uri: str) -> dict[str, Any]:
        tasks = params.task_names
        rows = results_rows(params)
        markdown = results_markdown(rows, tasks)
        io.write_bytes_atomic(markdown.encode(), io.join_uri(uri, "results.md"))
        io.write_bytes_atomic(_csv_text(rows).encode(), io.join_uri(uri, "results.csv"))
        io.write_bytes_atomic(_plot_png(rows), io.join_uri(uri, "results.png"))
        plot_rows = [{"model": f"{r['method']} ({r['variant']})", "mean_norm": r["mean_norm"]} for r in rows]
        io.write_bytes_atomic(_csv_text(plot_rows).encode(), io.join_uri(uri, "plot.csv"))
        metrics = {f"{r['method']}/{r['variant']}": {"mean_abs": round(r["mean_abs"], 2),
                                                      "mean_norm": round(r["mean_norm"], 2)} for r in rows}
        io.write_json(metrics, io.join_uri(uri, "metrics.json"))
        return {"table": markdown, "metrics": metrics}

    return _run(params, "report", work, force=force)


def _jsonable(value: Any) -> Any:
    """Tensors and numpy scalars to plain numbers, recursively (histories, merge info)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
