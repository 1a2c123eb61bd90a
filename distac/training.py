"""Fine-tuning recipes: the knobs that make task vectors differ in norm (lr, steps, weight decay) and in
confidence (label smoothing, mixup, focal loss), so both DisTaC failure modes can be produced on purpose.

``finetune`` is deterministic for a recipe and data: the head is seeded, batches come from a seeded
generator, mixup draws from a seeded stream, and the caller's global RNG is left untouched.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distac.data.examples import TaskData
from distac.errors import ConfigError, DistacError
from distac.models.base import ModelAdapter, TaskModel

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")


@dataclass
class FinetuneRecipe:
    """How one source model is fine-tuned. Validated on construction (ConfigError names the field)."""

    lr: float = 2e-5
    steps: int = 200
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_fraction: float = 0.06
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    focal_gamma: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    train_head_only: bool = False
    bf16_autocast: bool = False  # only on CUDA

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr > 0,
            "steps": isinstance(self.steps, int) and self.steps >= 1,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "weight_decay": self.weight_decay >= 0,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "schedule": self.schedule in SCHEDULES,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "mixup_alpha": self.mixup_alpha >= 0,
            "focal_gamma": self.focal_gamma >= 0,
            "grad_clip": self.grad_clip is None or self.grad_clip >= 0,
            "seed": isinstance(self.seed, int),
        }
        for name, ok in checks.items():
            if not ok:
                expected = f" (one of {SCHEDULES})" if name == "schedule" else ""
                raise ConfigError(f"FinetuneRecipe.{name}: invalid value {getattr(self, name)!r}{expected}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FinetuneRecipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"FinetuneRecipe: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    model: TaskModel  # on the CPU, in eval mode
    history: list[dict[str, float]] = field(default_factory=list)  # {step, loss, lr} per step


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                        focal_gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of −Σ_c q_c (1 − p_c)^γ log p_c, with q the (smoothed) one-hot target.

    γ = 0 is cross-entropy with label smoothing; ε = 0 and γ > 0 is the focal loss −(1 − p_y)^γ log p_y.
    """
    if focal_gamma == 0:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    num_classes = logits.shape[-1]
    target = F.one_hot(labels, num_classes).float() * (1 - label_smoothing) + label_smoothing / num_classes
    focal_weight = (1 - log_probs.exp()).pow(focal_gamma)
    return -(target * focal_weight * log_probs).sum(dim=-1).mean()


def batch_indices(count: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches: each epoch a fresh seeded permutation; a batch may span two epochs."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(torch.randperm(count, generator=generator).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _trainable_parameters(model: TaskModel, head_only: bool) -> list[torch.nn.Parameter]:
    head = [p for p in model.head.parameters() if p.requires_grad]
    if head_only:
        if not head:
            raise ConfigError("FinetuneRecipe.train_head_only: this model's head has no trainable parameters "
                              "(a frozen zero-shot head)")
        return head
    return model.backbone_parameters() + head


def _to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


def finetune(adapter: ModelAdapter, task_data: TaskData, recipe: FinetuneRecipe, *, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> FinetuneResult:
    """Fine-tune a fresh model for ``task_data`` from the adapter's pretrained backbone.

    Mixup mixes the pooled features before the head (and the labels' losses with the same λ).
    ``on_step(step, {"loss", "lr"})`` is called after every optimizer step (1-based), e.g. to log to MLflow.
    """
    train: Sequence = task_data.train
    if len(train) == 0:
        raise DistacError(f"task {task_data.name!r} has no training examples")
    if train[0].label is None:
        raise DistacError(f"task {task_data.name!r}: fine-tuning needs labelled training examples")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = adapter.build(task_data.num_classes, task_data.class_names, seed=recipe.seed).to(device)
        history = _train(model, adapter, train, recipe, device, progress, on_step, task_data.name)
    return FinetuneResult(model.cpu().eval(), history)


def _train(model: TaskModel, adapter: ModelAdapter, train: Sequence, recipe: FinetuneRecipe,
           device: torch.device, progress: bool, on_step, task_name: str) -> list[dict[str, float]]:
    generative = hasattr(model, "supervised_loss")
    if generative and (recipe.mixup_alpha > 0 or recipe.focal_gamma > 0 or recipe.train_head_only):
        raise DistacError(f"task {task_name!r}: a causal LM is fine-tuned with token-level cross-entropy on its "
                          "completions; mixup_alpha, focal_gamma and train_head_only do not apply (use "
                          "label_smoothing for a soft source)")
    parameters = _trainable_parameters(model, recipe.train_head_only)
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup_steps = round(recipe.warmup_fraction * recipe.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, recipe.steps, warmup_steps, recipe.schedule))
    generator = torch.Generator().manual_seed(recipe.seed)
    mixup_rng = random.Random(recipe.seed)
    batches = batch_indices(len(train), recipe.batch_size, generator)
    use_bf16 = recipe.bf16_autocast and device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    model.train()
    history = []
    bar = tqdm(range(1, recipe.steps + 1), desc=f"finetune {task_name}", disable=not progress, leave=False)
    for step in bar:
        examples = [train[i] for i in next(batches)]
        if any(example.label is None for example in examples):
            raise DistacError(f"task {task_name!r}: an unlabeled example is in the training split")
        labels = torch.tensor([example.label for example in examples], device=device)
        inputs = _to_device(adapter.collate(examples), device)
        with autocast:
            if generative:  # a causal LM: cross-entropy on the gold completion's tokens only
                loss = model.supervised_loss(inputs, labels, recipe.label_smoothing)
            elif recipe.mixup_alpha > 0:
                features = model.features(inputs)
                lam = mixup_rng.betavariate(recipe.mixup_alpha, recipe.mixup_alpha)
                partner = torch.randperm(len(examples), generator=generator).to(device)
                logits = model.head(lam * features + (1 - lam) * features[partner])
                loss = (lam * classification_loss(logits, labels, recipe.label_smoothing, recipe.focal_gamma)
                        + (1 - lam) * classification_loss(logits, labels[partner], recipe.label_smoothing,
                                                          recipe.focal_gamma))
            else:
                loss = classification_loss(model(inputs), labels, recipe.label_smoothing, recipe.focal_gamma)
        if not torch.isfinite(loss):
            raise DistacError(f"fine-tuning {task_name}: the loss became {loss.item()} at step {step} "
                              f"(lr {recipe.lr} too large?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": float(loss.item()), "lr": float(lr)}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if on_step is not None:
            on_step(step, {"loss": record["loss"], "lr": record["lr"]})
    model.eval()
    logger.info("fine-tuned %s: %d steps, loss %.4f -> %.4f", task_name, recipe.steps, history[0]["loss"],
                history[-1]["loss"])
    return history
