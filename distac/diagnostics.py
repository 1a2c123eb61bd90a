"""Diagnose the two failure modes of merging before merging, and recommend DisTaC settings.

Per task: ‖τ_t‖ and its ratio to the smallest norm, pairwise cosines, label-free confidence on unlabeled
inputs (mean max-probability, mean entropy) and, where labels exist, ECE on validation data. A causal LM
given free text only (no labelled task data) reports its next-token confidence over every token of the texts
(``text_confidence``): reported, never flagged, since free text's own entropy keeps it low whatever the
model and there is no accuracy to compare it with.

Flags (thresholds are arguments; defaults below):

- ``norm_disparity`` on task t when ‖τ_t‖ / min_s ‖τ_s‖ > 2. With orthogonal vectors and norm ratio
  δ = 2, the shorter one's cosine with their sum is 1/√5 ≈ 0.45 (0.71 at equal norms): past this point the
  short task starts to vanish from the merge (METHODS.md, failure mode 1).
- ``low_confidence`` on task t when its scaled confidence c = (mean max-prob − 1/C)/(1 − 1/C) is below
  0.7 **and**, where labeled validation data is given, the model is underconfident there: its mean
  max-probability lies more than 0.03 below its accuracy. c is 0 at chance and 1 for one-hot predictions,
  comparable across class counts, and for a model that fits label smoothing ε it equals 1 − ε: the
  threshold flags sources softer than label smoothing 0.3, the regime where the paper's low-confidence
  drops appear (failure mode 2). Softness alone is not the failure: a plain cross-entropy model of a hard
  task is soft because the task is hard, and is as confident as it is accurate (or more); a smoothed one
  is less confident than it is accurate. Without validation data the threshold alone decides.

Recommendations: a task flagged for norm disparity gets κ_t = r · min_s ‖τ_s‖ / ‖τ_t‖ with r the
norm-ratio threshold: the least shrink toward the others that clears its flag. Every other task keeps
κ_t = 1, so no vector is shrunk that its own norm ratio does not flag. (Shrinking all the way to the
others' median norm was measured on an earlier default run: SST-2 at κ = 0.23 kept its own accuracy after
DisTaC but collapsed inside the merges; at the threshold, κ = 0.44, it held up better.) A low-confidence task
gets T_tcr = 1 and T_stu = the smallest s ≥ 1 at which its own teacher logits, sharpened to softmax(s·z),
reach scaled confidence 0.8 (DisTaC drives z_s ≈ s·z_t), capped at 10; any other task T_stu = T_tcr
(norm-only conditioning never sharpens). The target was 0.95 until measured: on the default pipeline's
label-smoothed SST-2 (T_stu 10 → 3.4) and the paper benchmark's soft sources (T_stu 10 → 3), the milder
sharpening kept the students' accuracy and merged better under every headline method; ×10 logits made the
sharpened vectors crowd out the unconditioned tasks (benchmarks/results/paper/FINDINGS.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from distac.calibration import ConfidenceStats, confidence_stats, expected_calibration_error
from distac.conditioning import DistacConfig, kappa_policy
from distac.errors import ConfigError
from distac.evaluation import Collate, labels_of, predict_logits
from distac.models.base import TaskModel
from distac.vectors import TaskVector

log = logging.getLogger(__name__)

NORM_RATIO_THRESHOLD = 2.0
CONFIDENCE_THRESHOLD = 0.7
UNDERCONFIDENCE_MARGIN = 0.03  # accuracy − mean max-prob on validation data, for the low-confidence flag
TARGET_CONFIDENCE = 0.8
MAX_TEMPERATURE_RATIO = 10.0
HOLD_OUT = "hold-out of train"  # TaskDiagnosis.accuracy_split of a validation split held out of the training data
INPUTS, TEXT_TOKENS = "inputs", "text tokens"  # TaskDiagnosis.confidence_over


@dataclass
class TaskDiagnosis:
    name: str
    norm: float
    norm_ratio: float  # ‖τ_t‖ / the smallest norm among the tasks
    num_classes: int | None = None
    mean_max_prob: float | None = None
    mean_entropy: float | None = None
    scaled_confidence: float | None = None
    accuracy: float | None = None  # on the labeled validation data
    confidence_gap: float | None = None  # validation accuracy − mean max-prob there: > 0 is underconfident
    ece: float | None = None
    sharpening_temperature: float | None = None  # s reaching the target confidence; only when flagged
    flags: list[str] = field(default_factory=list)
    confidence_over: str | None = None  # what the confidence was read on: "inputs" or "text tokens"
    accuracy_split: str | None = None  # where accuracy and ECE come from, e.g. "validation", "hold-out of train"


@dataclass
class Recommendation:
    task: str
    condition: bool
    kappa: float
    teacher_temperature: float
    student_temperature: float
    reasons: list[str]

    def config(self, **overrides: Any) -> DistacConfig:
        """A DisTaC config with these κ and temperatures (other fields from ``overrides`` or defaults)."""
        return DistacConfig(kappa=self.kappa, teacher_temperature=self.teacher_temperature,
                            student_temperature=self.student_temperature, **overrides)


@dataclass
class Diagnosis:
    tasks: list[TaskDiagnosis]
    cosines: list[list[float]]  # [i][j]: cosine of τ_i and τ_j
    thresholds: dict[str, float]
    recommendations: list[Recommendation] = field(default_factory=list)

    @property
    def flags(self) -> dict[str, list[str]]:
        """Flag → the tasks that raised it."""
        out: dict[str, list[str]] = {}
        for task in self.tasks:
            for flag in task.flags:
                out.setdefault(flag, []).append(task.name)
        return out

    @property
    def notes(self) -> list[str]:
        """What the numbers were measured on, where a reader could misread them."""
        notes = []
        held_out = [t.name for t in self.tasks if t.accuracy is not None and t.accuracy_split == HOLD_OUT]
        if held_out:
            notes.append(f"accuracy, acc. − conf. and ECE of {', '.join(held_out)}: on a seeded hold-out of the "
                         "training data; a checkpoint trained on the whole training file has seen it, so they can "
                         "read high: give the data spec a `validation` split for an unseen one")
        text = [t.name for t in self.tasks if t.confidence_over == TEXT_TOKENS]
        if text:
            notes.append(f"confidence of {', '.join(text)}: mean max next-token probability over every non-padding "
                         "position of the unlabeled texts; reported, not flagged (free text's own entropy keeps it "
                         "low, and without labels there is no accuracy to compare it with: give --data for the "
                         "low-confidence check)")
        return notes

    def to_dict(self) -> dict[str, Any]:
        names = [t.name for t in self.tasks]
        return {"tasks": [asdict(t) for t in self.tasks],
                "cosines": {a: dict(zip(names, row)) for a, row in zip(names, self.cosines)},
                "flags": self.flags, "thresholds": self.thresholds,
                "recommendations": [asdict(r) for r in self.recommendations], "notes": self.notes}

    def to_markdown(self) -> str:
        def fmt(value: float | None, spec: str = ".3f") -> str:
            return "–" if value is None else format(value, spec)

        labelled = [t for t in self.tasks if t.accuracy is not None]
        splits = {t.accuracy_split for t in labelled}
        shared = next(iter(splits)) if len(splits) == 1 else None  # one split for all: name it in the header
        header = ["Task", "‖τ‖", "ratio to min", "mean max-prob", "mean entropy", "scaled conf."]
        if labelled:
            header += [f"accuracy ({shared})" if shared else "accuracy", "acc. − conf.", "ECE"]
        lines = ["| " + " | ".join(header + ["flags"]) + " |", "|" + "---|" * (len(header) + 1)]
        for t in self.tasks:
            cells = [t.name, f"{t.norm:.4g}", f"{t.norm_ratio:.2f}", fmt(t.mean_max_prob), fmt(t.mean_entropy),
                     fmt(t.scaled_confidence)]
            if labelled:
                split = f" ({t.accuracy_split})" if t.accuracy is not None and t.accuracy_split and not shared else ""
                cells += [fmt(t.accuracy) + split, fmt(t.confidence_gap, "+.3f"), fmt(t.ece)]
            lines.append("| " + " | ".join(cells + [", ".join(t.flags) or "–"]) + " |")
        lines += [f"\nNote: {note}." for note in self.notes]
        names = [t.name for t in self.tasks]
        lines += ["", "Pairwise cosines:", "", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {a} | " + " | ".join(f"{c:.3f}" for c in row) + " |" for a, row in zip(names, self.cosines)]
        if self.recommendations:
            lines += ["", "| Task | condition | κ | T_tcr | T_stu | why |", "|---|---|---|---|---|---|"]
            lines += [f"| {r.task} | {'yes' if r.condition else 'no'} | {r.kappa:.3f} | "
                      f"{r.teacher_temperature:g} | {r.student_temperature:.3g} | {'; '.join(r.reasons) or '–'} |"
                      for r in self.recommendations]
        return "\n".join(lines)


def sharpening_temperature(logits: torch.Tensor, target: float = TARGET_CONFIDENCE,
                           cap: float = MAX_TEMPERATURE_RATIO) -> float:
    """The smallest s in [1, cap] with scaled confidence of softmax(s·logits) ≥ target (bisection).

    Mean max-probability grows monotonically with s, so bisection on log s converges; returns ``cap``
    when even s = cap falls short.
    """
    def reaches(scale: float) -> bool:
        return confidence_stats(logits.double() * scale).scaled_confidence >= target

    if reaches(1.0):
        return 1.0
    if not reaches(cap):
        return cap
    low, high = 0.0, math.log(cap)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if reaches(math.exp(middle)) else (middle, high)
    return math.exp(high)


def diagnose(task_vectors: Mapping[str, Mapping[str, torch.Tensor]],
             unlabeled_logits: Mapping[str, torch.Tensor] | None = None,
             validation: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None, *,
             norm_ratio_threshold: float = NORM_RATIO_THRESHOLD,
             confidence_threshold: float = CONFIDENCE_THRESHOLD,
             target_confidence: float = TARGET_CONFIDENCE,
             underconfidence_margin: float = UNDERCONFIDENCE_MARGIN,
             text_confidence: Mapping[str, ConfidenceStats] | None = None,
             validation_splits: Mapping[str, str] | None = None) -> Diagnosis:
    """Diagnose tasks from their vectors, teacher logits on unlabeled inputs and (logits, labels) of a
    labeled validation split; the last two are optional and keyed by task name like ``task_vectors``.

    ``text_confidence``: a causal LM's next-token confidence over free text (``text_confidence_stats``), for a
    task without ``unlabeled_logits``; reported, never flagged. ``validation_splits``: task → what its
    validation data is (``"validation"``, ``HOLD_OUT``), named beside its accuracy."""
    if not task_vectors:
        raise ConfigError("diagnose needs at least one task vector")
    if not norm_ratio_threshold >= 1:
        raise ConfigError(f"norm_ratio_threshold must be >= 1, got {norm_ratio_threshold}")
    if not 0 < confidence_threshold < target_confidence <= 1:
        raise ConfigError(f"need 0 < confidence_threshold < target_confidence <= 1, got "
                          f"{confidence_threshold} and {target_confidence}")
    if not 0 <= underconfidence_margin < 1:
        raise ConfigError(f"underconfidence_margin must be in [0, 1), got {underconfidence_margin}")
    for name in list(unlabeled_logits or {}) + list(validation or {}) + list(text_confidence or {}):
        if name not in task_vectors:
            raise ConfigError(f"logits given for task {name!r}, which has no task vector")
    both = set(unlabeled_logits or {}) & set(text_confidence or {})
    if both:
        raise ConfigError(f"tasks {sorted(both)} have both unlabeled logits and text confidence; give one")
    names = list(task_vectors)
    vectors = [v if isinstance(v, TaskVector) else TaskVector(v) for v in task_vectors.values()]
    norms = [v.norm() for v in vectors]
    smallest = min(norms)
    cosines = [[1.0 if i == j else 0.0 for j in range(len(vectors))] for i in range(len(vectors))]
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            cosines[i][j] = cosines[j][i] = vectors[i].cosine(vectors[j])

    tasks = []
    for name, norm in zip(names, norms):
        ratio = norm / smallest if smallest > 0 else (1.0 if norm == 0 else math.inf)
        task = TaskDiagnosis(name=name, norm=norm, norm_ratio=ratio)
        if ratio > norm_ratio_threshold:
            task.flags.append("norm_disparity")
        if validation and name in validation:
            logits, labels = validation[name]
            probs = torch.softmax(logits.double(), dim=1)
            task.ece = expected_calibration_error(probs, labels)
            task.accuracy = float((probs.argmax(dim=1) == labels).double().mean())
            task.confidence_gap = task.accuracy - float(probs.max(dim=1).values.mean())
            task.accuracy_split = (validation_splits or {}).get(name)
        if text_confidence and name in text_confidence:
            stats = text_confidence[name]
            task.num_classes, task.mean_max_prob = stats.num_classes, stats.mean_max_prob
            task.mean_entropy, task.scaled_confidence = stats.mean_entropy, stats.scaled_confidence
            task.confidence_over = TEXT_TOKENS
        if unlabeled_logits and name in unlabeled_logits:
            logits = unlabeled_logits[name]
            stats = confidence_stats(logits)
            task.confidence_over = INPUTS
            task.num_classes, task.mean_max_prob = stats.num_classes, stats.mean_max_prob
            task.mean_entropy, task.scaled_confidence = stats.mean_entropy, stats.scaled_confidence
            if task.accuracy is not None and stats.num_classes != validation[name][0].shape[1]:
                # a causal LM: its confidence is the next token's over the vocabulary, not over the candidates
                task.confidence_gap = task.accuracy - stats.mean_max_prob
            underconfident = task.confidence_gap is None or task.confidence_gap > underconfidence_margin
            if stats.scaled_confidence < confidence_threshold and underconfident:
                task.flags.append("low_confidence")
                task.sharpening_temperature = sharpening_temperature(logits, target_confidence)
        tasks.append(task)
    diagnosis = Diagnosis(tasks=tasks, cosines=cosines, thresholds={
        "norm_ratio": norm_ratio_threshold, "scaled_confidence": confidence_threshold,
        "target_confidence": target_confidence, "underconfidence_margin": underconfidence_margin})
    diagnosis.recommendations = recommend(diagnosis)
    log.info("diagnosed %d tasks; flags: %s", len(tasks), diagnosis.flags or "none")
    return diagnosis


def recommend(diagnosis: Diagnosis) -> list[Recommendation]:
    """Which tasks to condition and with which κ and temperatures (rules in the module docstring)."""
    long = {t.name: t.norm for t in diagnosis.tasks if "norm_disparity" in t.flags}
    smallest = min(t.norm for t in diagnosis.tasks)
    target = diagnosis.thresholds["norm_ratio"] * smallest
    kappas = kappa_policy(long, target) if long and target > 0 else {}
    out = []
    for task in diagnosis.tasks:
        kappa, t_student, reasons = kappas.get(task.name, 1.0), 1.0, []
        if kappa < 1:
            reasons.append(f"norm {task.norm_ratio:.2f}× the smallest: shrink to "
                           f"{diagnosis.thresholds['norm_ratio']:g}× it ({target:.4g})")
        if "low_confidence" in task.flags:
            t_student = task.sharpening_temperature or 1.0
            gap = "" if task.confidence_gap is None else f", {task.confidence_gap:.2f} below its accuracy"
            reasons.append(f"scaled confidence {task.scaled_confidence:.2f} < "
                           f"{diagnosis.thresholds['scaled_confidence']}{gap}: sharpen by T_stu/T_tcr = "
                           f"{t_student:.3g}")
        out.append(Recommendation(task=task.name, condition=bool(reasons), kappa=kappa, teacher_temperature=1.0,
                                  student_temperature=t_student, reasons=reasons))
    return out


# --------------------------------------------------------------------------------------------- from models


@dataclass
class SourceModel:
    """A fine-tuned source model with what diagnosing it needs."""

    name: str
    model: TaskModel
    collate: Callable[[Sequence[Any]], Mapping[str, torch.Tensor]]
    unlabeled: Sequence[Any]
    validation: Sequence[Any] | None = None  # labeled; enables ECE


def diagnose_models(pretrained: Mapping[str, torch.Tensor], sources: Sequence[SourceModel], *,
                    batch_size: int = 64, progress: bool = False, **thresholds: float) -> Diagnosis:
    """Task vectors from the models' backbones, logits from running them; then ``diagnose``."""
    if len({s.name for s in sources}) != len(sources):
        raise ConfigError(f"source model names must be unique, got {[s.name for s in sources]}")
    vectors, unlabeled_logits, validation = {}, {}, {}
    for source in sources:
        vectors[source.name] = TaskVector.from_state_dicts(pretrained, source.model.backbone_state())
        unlabeled_logits[source.name] = predict_logits(source.model, source.unlabeled, source.collate,
                                                       batch_size, progress, confidence=True)
        if source.validation:
            logits = predict_logits(source.model, source.validation, source.collate, batch_size, progress)
            validation[source.name] = (logits, labels_of(source.validation))
    return diagnose(vectors, unlabeled_logits, validation, **thresholds)


@torch.no_grad()
def text_confidence_stats(model: TaskModel, texts: Sequence[Any], collate: Collate, batch_size: int = 64,
                          progress: bool = False) -> ConfidenceStats:
    """A causal LM's label-free confidence on free text: mean max next-token probability and mean entropy over
    every non-padding position of ``texts`` (the positions DisTaC distils), accumulated batch by batch so no
    [texts, length, vocabulary] tensor is ever held."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_prob, entropy, positions, vocabulary = 0.0, 0.0, 0, 0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="confidence", unit="batch", disable=not progress):
            inputs = {k: v.to(device) for k, v in collate(texts[start:start + batch_size]).items()}
            logits, mask = model.distillation_outputs(inputs)
            if mask is None:
                raise ConfigError("text confidence is for causal LMs (next-token outputs); this model gives class "
                                  "logits: read its confidence with predict_logits(..., confidence=True)")
            log_probs = torch.log_softmax(logits[mask].float(), dim=-1)  # [positions, vocabulary]
            probs = log_probs.exp()
            max_prob += float(probs.max(dim=-1).values.double().sum())
            entropy += float(-(probs * log_probs).sum(dim=-1).double().sum())
            positions, vocabulary = positions + int(mask.sum()), int(logits.shape[-1])
    finally:
        model.train(was_training)
    if not positions:
        raise ConfigError("text confidence needs at least one non-padding position; the texts are empty")
    return ConfidenceStats(mean_max_prob=max_prob / positions, mean_entropy=entropy / positions,
                           num_classes=vocabulary)
