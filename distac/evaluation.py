"""Accuracy of fine-tuned and merged models, normalized accuracy, and the per-method α search.

Task t of a merge is always served with θ_pre + α·τ_m (EMR: its own per-task vector) and its own head.
Normalized accuracy divides by the accuracy of the ORIGINAL fine-tuned source model, never by that of its
conditioned copy (METHODS.md, "Metrics").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from distac.calibration import confidence_stats, expected_calibration_error
from distac.errors import ConfigError
from distac.device import resolve_device
from distac.merging import Merged, merge, method_class
from distac.models.base import TaskModel

log = logging.getLogger(__name__)

Collate = Callable[[Sequence[Any]], Mapping[str, torch.Tensor]]
EDGE_EXTENSIONS = 3  # α's tried beyond an edge of the grid that the best α sits on
EDGE_STEP = 1.5  # the factor between them
DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


class EvalTask(Protocol):
    """What evaluation needs of a task (``distac.data.TaskData`` fits)."""

    name: str
    num_classes: int
    class_names: list[str]


class Builder(Protocol):
    """What evaluation needs of a model adapter (``distac.models.base.ModelAdapter`` fits)."""

    def build(self, num_classes: int, class_names: Sequence[str] | None = None, seed: int = 0) -> TaskModel: ...

    def collate(self, examples: Sequence[Any]) -> Mapping[str, torch.Tensor]: ...


# --------------------------------------------------------------------------------------------- basics


@torch.no_grad()
def predict_logits(model: TaskModel, examples: Sequence[Any], collate: Collate, batch_size: int = 64,
                   progress: bool = False, confidence: bool = False) -> torch.Tensor:
    """Logits [N, C] (float32, CPU) of ``model`` in eval mode on ``examples``, in order.

    ``confidence``: the logits the model's confidence is read from instead (``TaskModel.confidence_logits``;
    for a causal LM the next-token logits [N, vocab] after each prompt)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="predict", unit="batch",
                          disable=not progress):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                      for k, v in collate(examples[start:start + batch_size]).items()}
            chunks.append((model.confidence_logits(inputs) if confidence else model(inputs)).float().cpu())
    finally:
        model.train(was_training)
    if not chunks:
        raise ConfigError("cannot predict on an empty set of examples")
    return torch.cat(chunks)


@torch.no_grad()
def _perplexity(model: TaskModel, items: Sequence[Any], batch_size: int, progress: bool, desc: str,
                batch_nll: Callable[[Sequence[Any], torch.device], tuple[float, float]]) -> float | None:
    """exp(summed NLL / token count) over ``items`` in batches; ``batch_nll`` gives one batch's (NLL, tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    try:
        for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", disable=not progress):
            nll, tokens = batch_nll(items[start:start + batch_size], device)
            total, count = total + nll, count + tokens
    finally:
        model.train(was_training)
    return math.exp(total / count) if count else None


def completion_perplexity(model: TaskModel, examples: Sequence[Any], collate: Collate, batch_size: int = 64,
                          progress: bool = False) -> float | None:
    """exp(mean negative log-likelihood per token) of the gold completions of labeled ``examples`` after their
    prompts, for a generative model (``completion_nll``); None for a classifier."""
    if not hasattr(model, "completion_nll"):
        return None

    def batch_nll(chunk: Sequence[Any], device: torch.device) -> tuple[float, float]:
        inputs = {k: v.to(device) for k, v in collate(chunk).items()}
        nll, tokens = model.completion_nll(inputs, labels_of(chunk).to(device))
        return float(nll.sum()), float(tokens.sum())

    return _perplexity(model, examples, batch_size, progress, "perplexity", batch_nll)


def text_perplexity(model: TaskModel, texts: Sequence[Any], collate: Collate, batch_size: int = 64,
                    progress: bool = False) -> float | None:
    """exp(mean negative log-likelihood per token) of free ``texts`` under a causal LM: every real token after
    the first predicted from the ones before it (held-out perplexity); None for a classifier."""
    if not hasattr(model, "completion_nll"):
        return None

    def batch_nll(chunk: Sequence[Any], device: torch.device) -> tuple[float, float]:
        inputs = {k: v.to(device) for k, v in collate(chunk).items()}
        logits, mask = model.distillation_outputs(inputs)
        targets = inputs["input_ids"][:, 1:]
        where = mask[:, 1:] & mask[:, :-1]  # position p predicts token p + 1; both real
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][where].float(), targets[where], reduction="sum")
        return float(nll), float(where.sum())

    return _perplexity(model, texts, batch_size, progress, "text perplexity", batch_nll)


def labels_of(examples: Sequence[Any]) -> torch.Tensor:
    """The integer labels of labeled examples (anything with a ``.label``)."""
    labels = [getattr(example, "label", None) for example in examples]
    missing = sum(label is None for label in labels)
    if missing:
        raise ConfigError(f"{missing} of {len(labels)} examples have no label; evaluation needs labeled data")
    return torch.tensor(labels, dtype=torch.long)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ConfigError(f"accuracy needs [N, C] logits and N labels, got {tuple(logits.shape)} "
                          f"and {tuple(labels.shape)}")
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())


def matthews_correlation(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation of the argmax predictions (GLUE's CoLA metric; the multiclass form R_K for more
    than two classes). 0 when every prediction or every label is one class, as scikit-learn returns."""
    predicted = logits.argmax(dim=1).cpu()
    labels = labels.cpu()
    classes = int(max(logits.shape[1], int(labels.max()) + 1))
    n, correct = labels.numel(), int((predicted == labels).sum())
    p = torch.bincount(predicted, minlength=classes).double()
    t = torch.bincount(labels, minlength=classes).double()
    numerator = correct * n - float(p @ t)
    denominator = ((n * n - float(p @ p)) * (n * n - float(t @ t))) ** 0.5
    return numerator / denominator if denominator > 0 else 0.0


def normalized_accuracy(merged_acc: float, finetuned_acc: float) -> float:
    """Merged accuracy / the original fine-tuned source model's accuracy on the same task and split."""
    if not finetuned_acc > 0:
        raise ConfigError(f"normalized accuracy needs a fine-tuned accuracy > 0, got {finetuned_acc!r}")
    return merged_acc / finetuned_acc


@dataclass
class TaskEvaluation:
    """One model on one task: accuracy plus label-free confidence and ECE."""

    task: str
    accuracy: float
    num_examples: int
    mean_max_prob: float
    mean_entropy: float
    ece: float
    normalized_accuracy: float | None = None
    mcc: float | None = None  # Matthews correlation (reported for CoLA, as GLUE does)
    perplexity: float | None = None  # generative models: of the gold completions after their prompts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_logits(task: str, logits: torch.Tensor, labels: torch.Tensor,
                    finetuned_accuracy: float | None = None, perplexity: float | None = None) -> TaskEvaluation:
    acc = accuracy(logits, labels)
    stats = confidence_stats(logits)
    return TaskEvaluation(
        task=task, accuracy=acc, num_examples=int(labels.numel()), mean_max_prob=stats.mean_max_prob,
        mean_entropy=stats.mean_entropy, ece=expected_calibration_error(torch.softmax(logits.double(), 1), labels),
        normalized_accuracy=None if finetuned_accuracy is None else normalized_accuracy(acc, finetuned_accuracy),
        mcc=matthews_correlation(logits, labels), perplexity=perplexity)


def evaluate_task(model: TaskModel, examples: Sequence[Any], collate: Collate, *, task: str = "",
                  batch_size: int = 64, finetuned_accuracy: float | None = None,
                  progress: bool = False) -> TaskEvaluation:
    """Accuracy, confidence and ECE of ``model`` on labeled ``examples``."""
    logits = predict_logits(model, examples, collate, batch_size, progress)
    return evaluate_logits(task, logits, labels_of(examples), finetuned_accuracy,
                           completion_perplexity(model, examples, collate, batch_size, progress))


# --------------------------------------------------------------------------------------------- merged


@dataclass
class MergedEvaluation:
    """A merged model evaluated on every task it serves."""

    method: str
    alpha: float | None  # the α the model was served at (None: the method has none)
    split: str
    tasks: list[TaskEvaluation]

    @property
    def mean_accuracy(self) -> float:
        return sum(t.accuracy for t in self.tasks) / len(self.tasks)

    @property
    def mean_normalized_accuracy(self) -> float | None:
        values = [t.normalized_accuracy for t in self.tasks]
        return None if any(v is None for v in values) else sum(values) / len(values)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "alpha": self.alpha, "split": self.split,
                "mean_accuracy": self.mean_accuracy, "mean_normalized_accuracy": self.mean_normalized_accuracy,
                "tasks": [t.to_dict() for t in self.tasks]}

    def to_markdown(self) -> str:
        return per_task_table_markdown([self])


def _served_model(adapter: Builder, task: EvalTask, head: Mapping[str, torch.Tensor],
                  device: torch.device) -> TaskModel:
    model = adapter.build(task.num_classes, task.class_names)
    model.load_head(head)
    return model.to(device).eval()


def _check_alignment(merged_tasks: int, heads: Sequence[Any], tasks: Sequence[EvalTask]) -> None:
    if not (merged_tasks == len(heads) == len(tasks)):
        raise ConfigError(f"the merge covers {merged_tasks} tasks but {len(heads)} heads and {len(tasks)} "
                          f"task datasets were given; they must align one to one, in merge order")


def _finetuned_for(finetuned_accuracy: Mapping[str, float] | None, task: str) -> float | None:
    if finetuned_accuracy is None:
        return None
    if task not in finetuned_accuracy:
        raise ConfigError(f"no fine-tuned accuracy for task {task!r} (have: {', '.join(finetuned_accuracy)})")
    return finetuned_accuracy[task]


Served = Callable[[int], Mapping[Any, Mapping[str, torch.Tensor]]]
"""Task index → {label: the backbone state task i is served with under that label}."""


def evaluate_served(adapter: Builder, served: Served, heads: Sequence[Mapping[str, torch.Tensor]],
                    tasks: Sequence[EvalTask], *, split: str, batch_size: int = 64,
                    finetuned_accuracy: Mapping[str, float] | None = None,
                    device: torch.device | str | None = None, progress: bool = False,
                    on_task: Callable[[int, str], None] | None = None,
                    perplexity: bool = True) -> dict[Any, list[TaskEvaluation]]:
    """The one evaluation loop: for each task, its head on each backbone ``served(i)`` offers, evaluated on
    the task's ``split``; label → one TaskEvaluation per task. One model is in memory at a time.
    ``perplexity`` (generative models only) costs a second pass; the α search, which ranks by accuracy, skips it."""
    device = resolve_device(device)
    results: dict[Any, list[TaskEvaluation]] = {}
    for i, (task, head) in enumerate(zip(tasks, heads)):
        if on_task is not None:
            on_task(i, task.name)
        model = _served_model(adapter, task, head, device)
        examples = getattr(task, split)
        labels = labels_of(examples)
        for label, backbone in served(i).items():
            model.load_backbone(backbone)
            logits = predict_logits(model, examples, adapter.collate, batch_size, progress)
            results.setdefault(label, []).append(
                evaluate_logits(task.name, logits, labels, _finetuned_for(finetuned_accuracy, task.name),
                                completion_perplexity(model, examples, adapter.collate, batch_size, progress)
                                if perplexity else None))
        del model
    return results


def evaluate_merged(adapter: Builder, pretrained_state: Mapping[str, torch.Tensor], merged: Merged,
                    heads: Sequence[Mapping[str, torch.Tensor]], tasks: Sequence[EvalTask], *,
                    split: str = "test", finetuned_accuracy: Mapping[str, float] | None = None,
                    batch_size: int = 64, device: torch.device | str | None = None, progress: bool = False,
                    on_task: Callable[[int, str], None] | None = None) -> MergedEvaluation:
    """Serve task i with θ_pre + merged.for_task(i) and head i; evaluate on each task's ``split``.

    The merge is served as it is: it already carries its α (``merged.alpha``; ``at_alpha`` gives another).
    ``finetuned_accuracy`` (task name → accuracy of the original fine-tuned model on the same split) adds
    normalized accuracy.
    """
    _check_alignment(merged.num_tasks, heads, tasks)
    rows = evaluate_served(adapter, lambda i: {merged.alpha: merged.for_task(i).apply_to(pretrained_state)},
                           heads, tasks, split=split, batch_size=batch_size, finetuned_accuracy=finetuned_accuracy,
                           device=device, progress=progress, on_task=on_task)
    return MergedEvaluation(method=merged.method, alpha=merged.alpha, split=split, tasks=rows[merged.alpha])


def merged_text_perplexity(adapter: Builder, pretrained_state: Mapping[str, torch.Tensor], merged: Merged,
                           texts: Sequence[Any], *, batch_size: int = 64, device: torch.device | str | None = None,
                           progress: bool = False, collate: Collate | None = None) -> list[float | None]:
    """``text_perplexity`` of the model each task of a merge is served with (θ_pre + merged.for_task(i)); one
    pass when every task gets the same vector (every method but EMR)."""
    device = resolve_device(device)
    model = adapter.build(0).to(device).eval()  # free text needs no head
    values: list[float | None] = []
    for i in range(merged.num_tasks):
        if merged.masks is None and values:
            values.append(values[0])
            continue
        model.load_backbone(merged.for_task(i).apply_to(pretrained_state))
        values.append(text_perplexity(model, texts, collate or adapter.collate, batch_size, progress))
    return values


# --------------------------------------------------------------------------------------------- α search


def has_alpha(method_name: str) -> bool:
    """Whether the method's result is α·merge(...), so it can be merged once and scaled."""
    return method_class(method_name).has_alpha


def at_alpha(merged: Merged, alpha: float) -> Merged:
    """The same merge at another α: its vector rescaled from the α it carries (never scaled twice)."""
    if merged.alpha is None:
        raise ConfigError(f"{merged.method} has no α to change")
    factor = alpha if merged.alpha == 1.0 else alpha / merged.alpha
    return dataclasses.replace(merged, vector=merged.vector * factor, alpha=alpha)


@dataclass
class AlphaSearch:
    """α chosen by mean accuracy on a held-out split; ``merged`` is the result at that α (it carries it:
    evaluate it as it is)."""

    method: str
    alpha: float | None
    split: str
    scores: dict[float, float] = field(default_factory=dict)  # α → mean accuracy (empty without α)
    merged: Merged | None = None
    evaluation: MergedEvaluation | None = None  # at the chosen α, on ``split``
    extended: list[float] = field(default_factory=list)  # α's tried beyond the grid's edges

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "alpha": self.alpha, "split": self.split,
                "scores": {str(a): s for a, s in self.scores.items()}, "extended": self.extended,
                "evaluation": self.evaluation.to_dict() if self.evaluation else None}


def search_alpha(method_name: str, task_vectors: Sequence[Mapping[str, torch.Tensor]], adapter: Builder,
                 pretrained_state: Mapping[str, torch.Tensor], heads: Sequence[Mapping[str, torch.Tensor]],
                 tasks: Sequence[EvalTask], *, grid: Sequence[float] = DEFAULT_ALPHA_GRID,
                 split: str = "validation", hyperparams: Mapping[str, Any] | None = None,
                 batch_size: int = 64, device: torch.device | str | None = None,
                 progress: bool = False, on_task: Callable[[int, str], None] | None = None,
                 extend: int = EDGE_EXTENSIONS) -> AlphaSearch:
    """Pick α for a method by mean accuracy on ``split``.

    Methods whose result is α·merge(...) are merged ONCE at α = 1 and served at every α of the grid by
    scaling (equal to re-merging, far cheaper). Methods without α (emr, wudi) are merged and evaluated once.
    Ties go to the earliest α in the grid.

    A best α at the grid's largest (smallest) value says the optimum may lie beyond it: the search then tries
    up to ``extend`` more values, each ``EDGE_STEP`` × the last (÷ at the low end), while they score strictly
    better. Without it Iso-C's α sat at the top of the default grid in every paper-benchmark run
    (docs/pipeline.md, "The α search").
    """
    hyperparams = dict(hyperparams or {})
    if not has_alpha(method_name):
        merged = merge(method_name, task_vectors, device=device, **hyperparams)
        evaluation = evaluate_merged(adapter, pretrained_state, merged, heads, tasks, split=split,
                                     batch_size=batch_size, device=device, progress=progress, on_task=on_task)
        return AlphaSearch(method_name, None, split, {}, merged, evaluation)
    if "alpha" in hyperparams:
        raise ConfigError("search_alpha chooses alpha itself; do not pass it in hyperparams")
    if not grid or any(not a > 0 for a in grid):
        raise ConfigError(f"the alpha grid must be non-empty and positive, got {list(grid)}")

    merged = merge(method_name, task_vectors, device=device, alpha=1.0, **hyperparams)
    _check_alignment(merged.num_tasks, heads, tasks)
    grid = [float(a) for a in grid]
    per_alpha = evaluate_served(
        adapter, lambda i: _LazyBackbones(merged.for_task(i), pretrained_state, grid), heads, tasks, split=split,
        batch_size=batch_size, device=device, progress=progress, on_task=on_task, perplexity=False)
    def mean_accuracy(alpha: float) -> float:
        return sum(r.accuracy for r in per_alpha[alpha]) / len(per_alpha[alpha])

    scores = {alpha: mean_accuracy(alpha) for alpha in grid}
    best = max(scores, key=lambda a: (scores[a], -list(scores).index(a)))
    for _ in range(extend if len(scores) > 1 else 0):
        beyond = _beyond_edge(best, list(scores))
        if beyond is None:
            break
        per_alpha.update(evaluate_served(
            adapter, lambda i: _LazyBackbones(merged.for_task(i), pretrained_state, [beyond]), heads, tasks,
            split=split, batch_size=batch_size, device=device, progress=progress, on_task=on_task,
            perplexity=False))
        scores[beyond] = mean_accuracy(beyond)
        log.info("%s: alpha=%.3g was at the grid's edge; alpha=%.3g scores %.4f", method_name, best, beyond,
                 scores[beyond])
        if scores[beyond] <= scores[best]:
            break
        best = beyond
    log.info("%s: alpha=%.3g (mean %s accuracy %.4f)", method_name, best, split, scores[best])
    return AlphaSearch(method_name, best, split, scores, at_alpha(merged, best),
                       MergedEvaluation(method_name, best, split, per_alpha[best]),
                       extended=[a for a in scores if a not in grid])


def _beyond_edge(best: float, tried: Sequence[float]) -> float | None:
    """The next α past the edge of ``tried`` that ``best`` sits on; None when it is inside."""
    if best >= max(tried):
        return round(best * EDGE_STEP, 6)
    if best <= min(tried):
        return round(best / EDGE_STEP, 6)
    return None


class _LazyBackbones(Mapping[float, Mapping[str, torch.Tensor]]):
    """θ_pre + α·τ for each α of a grid, built only when asked for (one backbone in memory at a time)."""

    def __init__(self, vector: Any, pretrained_state: Mapping[str, torch.Tensor], grid: Sequence[float]):
        self.vector, self.pretrained_state, self.grid = vector, pretrained_state, list(dict.fromkeys(grid))

    def __getitem__(self, alpha: float) -> Mapping[str, torch.Tensor]:
        return self.vector.apply_to(self.pretrained_state, alpha)

    def __iter__(self):
        return iter(self.grid)

    def __len__(self) -> int:
        return len(self.grid)


# --------------------------------------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def per_task_table_markdown(evaluations: Sequence[MergedEvaluation],
                            finetuned_accuracy: Mapping[str, float] | None = None,
                            labels: Sequence[str] | None = None) -> str:
    """Rows = merged models, columns = tasks; each cell 'absolute (normalized)' in %, then the means.

    ``finetuned_accuracy`` adds an 'Individual' row (the source models, 100% normalized by definition).
    """
    if not evaluations:
        raise ConfigError("nothing to tabulate")
    task_names = [t.task for t in evaluations[0].tasks]
    labels = labels or [e.method if e.alpha is None else f"{e.method} (α={e.alpha:g})" for e in evaluations]
    lines = ["| Method | " + " | ".join(task_names) + " | Avg. abs. | Avg. norm. |",
             "|---|" + "---|" * (len(task_names) + 2)]
    if finetuned_accuracy is not None:
        accs = [finetuned_accuracy[name] for name in task_names]
        lines.append("| Individual | " + " | ".join(_pct(a) for a in accs)
                     + f" | {_pct(sum(accs) / len(accs))} | 100.0 |")
    for label, evaluation in zip(labels, evaluations):
        by_task = {t.task: t for t in evaluation.tasks}
        cells = [f"{_pct(by_task[n].accuracy)} ({_pct(by_task[n].normalized_accuracy)})" for n in task_names]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {_pct(evaluation.mean_accuracy)} | {_pct(evaluation.mean_normalized_accuracy)} |")
    return "\n".join(lines)


def perplexity_table_markdown(evaluations: Sequence[MergedEvaluation],
                              finetuned_perplexity: Mapping[str, float | None] | None = None,
                              labels: Sequence[str] | None = None) -> str | None:
    """Rows = merged models (and 'Individual': the source models), columns = tasks; each cell the perplexity of
    the task's gold completions after its prompts (lower is better). None when no model is generative."""
    if not evaluations:
        raise ConfigError("nothing to tabulate")
    task_names = [t.task for t in evaluations[0].tasks]
    if all(t.perplexity is None for e in evaluations for t in e.tasks):
        return None
    labels = labels or [e.method if e.alpha is None else f"{e.method} (α={e.alpha:g})" for e in evaluations]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.4g}"

    lines = ["| Perplexity (gold completions) | " + " | ".join(task_names) + " |", "|---|" + "---|" * len(task_names)]
    if finetuned_perplexity is not None:
        lines.append("| Individual | " + " | ".join(cell(finetuned_perplexity.get(n)) for n in task_names) + " |")
    for label, evaluation in zip(labels, evaluations):
        by_task = {t.task: t for t in evaluation.tasks}
        lines.append(f"| {label} | " + " | ".join(cell(by_task[n].perplexity) for n in task_names) + " |")
    return "\n".join(lines)


def results_table_markdown(results: Mapping[str, Mapping[str, MergedEvaluation]]) -> str:
    """The paper's summary layout: rows = methods, per setting an 'Abs.' and a 'Norm.' column (means, %).

    ``results``: setting (e.g. 'original', 'norm mismatch', 'norm mismatch + DisTaC') → method → result.
    """
    if not results:
        raise ConfigError("nothing to tabulate")
    settings = list(results)
    methods: list[str] = []
    for per_method in results.values():
        methods += [m for m in per_method if m not in methods]
    lines = ["| Method | " + " | ".join(f"{s} abs. | {s} norm." for s in settings) + " |",
             "|---|" + "---|---|" * len(settings)]
    for method in methods:
        cells = []
        for setting in settings:
            evaluation = results[setting].get(method)
            cells += (["–", "–"] if evaluation is None else
                      [_pct(evaluation.mean_accuracy), _pct(evaluation.mean_normalized_accuracy)])
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
