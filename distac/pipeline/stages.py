"""The stage functions: each reads its inputs from the run store and writes its outputs into its own
folder (``context.uri``), atomically, and returns a JSON-able summary. ``distac.pipeline.table`` says
which function serves which stage; ``distac.pipeline.runner`` decides whether it runs."""

from __future__ import annotations

import logging
from typing import Any

import torch

from distac.calibration import confidence_stats
from distac.conditioning import DistacConfig
from distac.conditioning import condition as run_distac
from distac.conditioning import token_level
from distac.data import TaskData, load_task, load_task_data, with_unlabeled
from distac.errors import ConfigError
from distac.diagnostics import diagnose as run_diagnose
from distac.evaluation import accuracy, evaluate_merged, labels_of, matthews_correlation, predict_logits, search_alpha
from distac.merging import merge as run_merge
from distac.merging.streaming import save_merged
from distac.models import build_adapter
from distac.models.base import ModelAdapter, TaskModel
from distac.models.resolve import checkpoint_class_names, load_model, model_family, paired_backbones
from distac.models.store import LoadedModel, backbone_uri, save_pretrained, save_task_model
from distac.pipeline.params import PipelineParams
from distac.pipeline.report import metrics, plot_png, results_csv, results_markdown, results_rows
from distac.pipeline.runner import StageContext
from distac.pipeline.store import VECTOR_FILE
from distac.training import FinetuneRecipe
from distac.training import finetune as run_finetune
from distac.vectors import TaskVector

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 64


# --------------------------------------------------------------------------------------------- inputs


def adapter(params: PipelineParams) -> ModelAdapter:
    """The model adapter the params describe."""
    return build_adapter(params.model.adapter_spec())


def task_data(params: PipelineParams, task: str) -> TaskData:
    """A task's train / validation / test splits as the params subsample them: a built-in task, or the task's
    ``data`` spec (classes in the order of its imported model's labels); DisTaC's inputs from ``unlabeled``."""
    data, entry = params.data, params.task(task)
    sizes = {"max_train": data.max_train, "max_eval": data.max_eval,
             "validation_fraction": data.validation_fraction, "seed": data.seed}
    if entry.data is None:
        root = data.vision_root if task.startswith(("vision:", "imagefolder:")) else data.glue_dir
        loaded = load_task(task, root=root, **sizes)
    else:
        class_names = checkpoint_class_names(entry.finetuned) if entry.finetuned else None
        loaded = load_task_data(task, entry.data, class_names=class_names, **sizes)
    unlabeled = entry.unlabeled
    if unlabeled is None:
        return loaded
    others = {unlabeled.from_task: task_data(params, unlabeled.from_task)} if unlabeled.from_task else None
    text = {"text": entry.data.text, "text_pair": entry.data.text_pair, "quoting": entry.data.quoting} \
        if entry.data else {}
    return with_unlabeled(loaded, unlabeled, other_tasks=others, **text)


def import_finetuned(context: StageContext, built: ModelAdapter, data: TaskData) -> LoadedModel:
    """The task's existing fine-tuned model, served by the pipeline's adapter; θ_pre is checked against it
    before it is loaded, and its class count against the task's data."""
    task, uri = context.ref.task, context.params.task(context.ref.task).finetuned
    pretrained = context.store.pretrained_uri()
    paired_backbones(pretrained, [uri])
    family = model_family(uri)
    if family not in (None, built.kind):
        raise ConfigError(f"tasks: {task}: the fine-tuned model {uri} is a {family} model but model.kind is "
                          f"{built.kind!r}; set model.kind: {family} (and model.name_or_path to its θ_pre)")
    loaded = load_model(uri, pretrained, task=task, class_names=data.class_names, adapter=built)
    if loaded.meta["num_classes"] != data.num_classes:
        raise ConfigError(f"tasks: {task}: the fine-tuned model {uri} has {loaded.meta['num_classes']} classes, "
                          f"its data {data.num_classes} ({data.class_names})")
    return loaded


def distac_config(params: PipelineParams, task: str, diagnosis: dict[str, Any]) -> DistacConfig:
    """The DisTaC config for one task: κ from the policy, T_stu from the diagnosis when 'auto', every other
    field as configured."""
    cfg = params.conditioning
    if cfg.kappa.policy == "explicit":
        kappa = {"kappa": cfg.kappa.value}
    elif cfg.kappa.policy == "target_norm":
        kappa = {"target_norm": cfg.kappa.value}
    elif cfg.kappa.policy == "recommended":
        kappa = {"kappa": next(r for r in diagnosis["recommendations"] if r["task"] == task)["kappa"]}
    else:
        kappa = {"target_norm": min(t["norm"] for t in diagnosis["tasks"])}
    student_temperature = cfg.student_temperature
    if student_temperature == "auto":
        recommendation = next(r for r in diagnosis["recommendations"] if r["task"] == task)
        student_temperature = cfg.teacher_temperature * recommendation["student_temperature"]
    shared = {name: getattr(cfg, name) for name in DistacConfig.__dataclass_fields__
              if name not in ("kappa", "target_norm", "student_temperature")}
    return DistacConfig(**shared, **kappa, student_temperature=student_temperature)


def accuracy_on(model: TaskModel, examples: Any, collate: Any, device: torch.device) -> tuple[float, torch.Tensor]:
    """Accuracy and logits of one model on labeled examples."""
    logits = predict_logits(model.to(device), examples, collate, batch_size=EVAL_BATCH_SIZE)
    return accuracy(logits, labels_of(examples)), logits


def jsonable(value: Any) -> Any:
    """Tensors and numpy scalars to plain numbers, recursively (histories, merge info)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------- stages


def pretrained(context: StageContext) -> dict[str, Any]:
    built = adapter(context.params)
    save_pretrained(built, context.store.pretrained_uri())
    state = built.pretrained_backbone_state()
    return {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())}


def finetune(context: StageContext) -> dict[str, Any]:
    params, task, store = context.params, context.ref.task, context.store
    built, data, recipe = adapter(params), task_data(params, task), params.recipe(task)
    device = context.device
    rows = data.rows.metrics() if data.rows else {}  # per split, read and used (metrics.json, MLflow)
    if data.rows:
        log.info("%s: rows read → used: %s", context.ref.key, data.rows.describe())
    if params.task(task).finetuned:  # an existing model: imported, not trained
        model, history = import_finetuned(context, built, data).model.to(device), []
        recipe_record: dict[str, Any] = {"imported": params.task(task).finetuned}
    else:
        result = run_finetune(built, data, FinetuneRecipe(**recipe.model_dump()), progress=context.progress,
                              on_step=context.on_metrics)
        model, history, recipe_record = result.model.to(device), result.history, recipe.model_dump()
    val_acc, val_logits = accuracy_on(model, data.validation, built.collate, device)
    test_acc, test_logits = accuracy_on(model, data.test, built.collate, device)
    summary = {"validation_accuracy": val_acc, "test_accuracy": test_acc,
               "test_mcc": matthews_correlation(test_logits, labels_of(data.test)),
               "validation_mean_max_prob": confidence_stats(val_logits).mean_max_prob,
               "train_examples": len(data.train), **rows, "final_loss": history[-1]["loss"] if history else None}
    save_task_model(store.model_uri(task), model.cpu(), built, task, data.num_classes, list(data.class_names),
                    extra={"recipe": recipe_record, **summary})
    confidence = None
    if token_level(model):  # a causal LM: its confidence is the next token's, over the whole vocabulary
        confidence = predict_logits(model, data.validation, built.collate, EVAL_BATCH_SIZE, confidence=True)
    store.save_validation_logits(task, val_logits, labels_of(data.validation), confidence)
    store.write_json(context.ref, "metrics.json", summary)
    store.write_json(context.ref, "history.json", jsonable(history))
    return summary


def extract(context: StageContext) -> dict[str, Any]:
    task, store = context.ref.task, context.store
    vector = TaskVector.from_checkpoints(backbone_uri(store.pretrained_uri()), backbone_uri(store.model_uri(task)))
    vector.save(store.file(context.ref, VECTOR_FILE))
    stats = {"norm": vector.norm(), "tensors": len(vector), "parameters": sum(t.numel() for t in vector.values())}
    store.write_json(context.ref, "stats.json", stats)
    return stats


def diagnose(context: StageContext) -> dict[str, Any]:
    params, store = context.params, context.store
    tasks = params.task_names
    logits = {t: store.validation_logits(t) for t in tasks}
    settings = params.diagnosis
    confidence = {t: store.confidence_logits(t) for t in tasks}
    diagnosis = run_diagnose({t: store.task_vector(t) for t in tasks}, confidence, logits,
                             norm_ratio_threshold=settings.norm_ratio, confidence_threshold=settings.min_scaled_confidence,
                             target_confidence=settings.target_confidence)
    configured = params.conditioning.tasks
    recommended = [r.task for r in diagnosis.recommendations if r.condition]
    selected = [t for t in tasks if t in (recommended if configured == "auto" else configured)]
    store.write_json(context.ref, "diagnosis.json", {**diagnosis.to_dict(), "conditioned_tasks": selected})
    store.write_text(context.ref, "diagnosis.md", diagnosis.to_markdown())
    log.info("DisTaC will condition: %s", ", ".join(selected) or "no task")
    return {"conditioned_tasks": selected, "flags": diagnosis.flags, "norms": {t.name: t.norm for t in diagnosis.tasks}}


def condition(context: StageContext) -> dict[str, Any]:
    params, task, store = context.params, context.ref.task, context.store
    diagnosis = store.diagnosis()
    if task not in diagnosis["conditioned_tasks"]:
        summary = {"conditioned": False}
        store.write_json(context.ref, "summary.json", summary)
        return summary
    cfg, config = params.conditioning, distac_config(params, task, diagnosis)
    loaded = store.task_model(task)
    device = context.device
    data = task_data(params, task)
    probe = None
    if cfg.track_accuracy:
        def probe(model: TaskModel) -> dict[str, float]:
            return {"validation_accuracy": accuracy_on(model, data.validation, loaded.adapter.collate, device)[0]}
    result = run_distac(loaded.model.to(device), store.pretrained_backbone(), store.task_vector(task),
                        data.unlabeled(cfg.num_unlabeled, cfg.seed), loaded.adapter.collate, config,
                        progress=context.progress, on_log=context.on_metrics, probe=probe)
    val_acc, _ = accuracy_on(loaded.model, data.validation, loaded.adapter.collate, device)
    result.vector.save(store.file(context.ref, VECTOR_FILE))
    details = result.to_dict()
    store.write_json(context.ref, "history.json", jsonable(details.pop("history")))
    summary = {"conditioned": True, "kappa": result.kappa, "original_norm": result.original_norm,
               "final_norm": result.final_norm, "validation_accuracy": val_acc}
    store.write_json(context.ref, "summary.json", {**summary, **jsonable(details)})
    return summary


def _heads_and_tasks(context: StageContext) -> tuple[list[dict[str, torch.Tensor]], list[TaskData]]:
    names = context.params.task_names
    return [context.store.head(t) for t in names], [task_data(context.params, t) for t in names]


def _task_logger(context: StageContext, doing: str):
    def on_task(index: int, task: str) -> None:
        log.info("%s: %s %s (%d/%d)", context.ref.key, doing, task, index + 1, len(context.params.task_names))
    return on_task


def _same_as_as_is(context: StageContext) -> bool:
    """A distac merge when DisTaC conditioned no task (``tasks: auto``, nothing flagged) and as-is is merged
    too: it would be the as-is merge again, so it is neither computed nor reported."""
    params, made = context.params, context.ref
    return made.variant == "distac" and "as-is" in params.merge.variants and \
        not context.store.any_conditioned(params.task_names)


def merge(context: StageContext) -> dict[str, Any]:
    params, store, made = context.params, context.store, context.ref
    method = params.merge.method(made.method)
    if _same_as_as_is(context):
        log.info("%s: DisTaC conditioned no task, so this is merge/%s/as-is again: not merged", made.key, made.method)
        store.mark_identical(made.method, made.variant, "as-is")
        return {"identical_to": "as-is"}
    vectors = [store.merge_input(t, made.variant) for t in params.task_names]
    search = None
    if method.alpha == "search":
        heads, tasks = _heads_and_tasks(context)
        search = search_alpha(made.method, vectors, adapter(params), store.pretrained_backbone(), heads, tasks,
                              grid=params.merge.alpha_grid, hyperparams=method.hyperparams,
                              batch_size=EVAL_BATCH_SIZE, device=context.device, progress=context.progress,
                              on_task=_task_logger(context, "α search on"))
        merged = search.merged
        for step, (alpha, score) in enumerate(sorted(search.scores.items())):
            context.report(step, {"alpha": alpha, "validation_mean_accuracy": score})
    else:
        alpha = {} if method.alpha is None else {"alpha": method.alpha}
        merged = run_merge(made.method, vectors, device=context.device, progress=context.progress,
                           **method.hyperparams, **alpha)
    save_merged(merged, store.merged_uri(made.method, made.variant), record={
        "variant": made.variant, "tasks": params.task_names, "hyperparameters": method.hyperparams,
        "info": jsonable(merged.info), "alpha_search": search.to_dict() if search else None})
    return {"alpha": merged.alpha, "merged_norm": merged.vector.norm()}


def evaluate(context: StageContext) -> dict[str, Any]:
    params, store, made = context.params, context.store, context.ref
    same_as = store.identical_to(made.method, made.variant)
    if same_as is not None:  # not merged (see merge): its accuracy is evaluate/<method>/<same_as>'s
        log.info("%s: the same model as %s/%s: not evaluated again", made.key, made.method, same_as)
        store.write_json(made, "evaluation.json", {"method": made.method, "variant": made.variant,
                                                   "identical_to": same_as})
        return {"identical_to": same_as}
    heads, tasks = _heads_and_tasks(context)
    evaluation = evaluate_merged(adapter(params), store.pretrained_backbone(), store.merged(made.method, made.variant),
                                 heads, tasks, split="test",
                                 finetuned_accuracy=store.finetuned_accuracy(params.task_names, "test"),
                                 batch_size=EVAL_BATCH_SIZE, device=context.device,
                                 on_task=_task_logger(context, "evaluating on"))
    result = {"method": made.method, "variant": made.variant, "alpha": evaluation.alpha,
              "mean_accuracy": evaluation.mean_accuracy,
              "mean_normalized_accuracy": evaluation.mean_normalized_accuracy,
              "tasks": {row.task: row.to_dict() for row in evaluation.tasks}}
    store.write_json(made, "evaluation.json", result)
    return {k: result[k] for k in ("alpha", "mean_accuracy", "mean_normalized_accuracy")}


def report(context: StageContext) -> dict[str, Any]:
    params, store, made = context.params, context.store, context.ref
    rows = results_rows(params, store)
    markdown = results_markdown(rows, params.task_names)
    if "distac" in params.merge.variants and not any(r["variant"] == "distac" for r in rows):
        markdown += "\nDisTaC conditioned no task: the distac merges would equal the as-is ones (not computed).\n"
    store.write_text(made, "results.md", markdown)
    store.write_text(made, "results.csv", results_csv(rows))
    store.write_text(made, "results.png", plot_png(rows))
    plot_rows = [{"model": f"{r['method']} ({r['variant']})", "mean_norm": r["mean_norm"]} for r in rows]
    store.write_text(made, "plot.csv", results_csv(plot_rows))
    values = metrics(rows)
    store.write_json(made, "metrics.json", values)
    return {"table": markdown, "metrics": values}
