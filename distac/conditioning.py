"""DisTaC: condition a task vector by distilling the fine-tuned model into a rescaled student.

The student starts at the anchor θ_0 = θ_pre + κτ and learns, on unlabeled inputs of the task, to match
the teacher θ_pre + τ (the original fine-tuned model, frozen, eval mode):

    L = T_tcr·T_stu · KL(softmax(z_t/T_tcr) ‖ softmax(z_s/T_stu))  (batch mean)  +  β‖θ − θ_0‖²

Only the shared backbone parameters covered by τ train; the head stays frozen. κ < 1 conditions the norm,
T_stu > T_tcr the confidence (z_s → (T_stu/T_tcr)·z_t: a sharper student). The result is τ' = θ − θ_pre.
The teacher never changes, so its logits on the fixed unlabeled set are computed once and reused
(``cache_teacher=False`` recomputes them every step as the published code does).

Speed (``benchmarks/distac_bench.py`` measures it against the published loop): the unlabeled set is
collated (tokenised) once and kept on the device, each batch cut to its own longest sequence; the teacher
cache is filled in length-sorted chunks; the regulariser's gradient 2β(θ − θ_0) is added with multi-tensor
ops instead of an autograd graph over every tensor; Adam is fused. All but the fused Adam leave the result
bit-identical; fused Adam rounds differently in the last bit. ``length_bucketing`` (off by default) also
batches inputs of similar length together: cheaper steps on text of mixed length, but other batches.
The student runs in eval mode (no dropout; batch-norm statistics frozen): the published setting (CLIP ViT)
has no dropout, and on a text encoder dropout noise would only add a floor to the distillation loss.
See ../shared/docs/METHODS.md, "DisTaC".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distac.errors import ConfigError, MismatchError
from distac.models.base import TaskModel
from distac.vectors import TaskVector

log = logging.getLogger(__name__)

Collate = Callable[[Sequence[Any]], Mapping[str, torch.Tensor]]
LogCallback = Callable[[int, dict[str, float]], None]
Probe = Callable[[TaskModel], Mapping[str, float]]

INPUT_CACHE_BYTES = 1 << 30  # collate the unlabeled set once when it fits in this; else batch by batch
BUCKET_WINDOW = 16  # length bucketing sorts windows of this many batches


# --------------------------------------------------------------------------------------------- config


@dataclass
class DistacConfig:
    """DisTaC hyperparameters. Neither ``kappa`` nor ``target_norm`` means κ = 1 (confidence only).

    ``target_norm`` gives κ = min(1, target_norm / ‖τ‖): shrink only, never stretch. An explicit ``kappa``
    is used as given (κ > 1 is allowed but logged: the paper finds stretching hurts).
    """

    kappa: float | None = None
    target_norm: float | None = None
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    beta: float = 0.1
    lr: float = 1e-5
    weight_decay: float = 0.0
    steps: int = 500
    batch_size: int = 128
    grad_clip: float | None = 1.0
    num_unlabeled: int | None = None
    log_every: int = 10
    seed: int = 0
    cache_teacher: bool = True
    length_bucketing: bool = False  # batches of similar-length inputs (text): less padding, other batches

    def __post_init__(self) -> None:
        if self.kappa is not None and self.target_norm is not None:
            raise ConfigError("kappa and target_norm are mutually exclusive; give at most one")
        _positive("kappa", self.kappa, allow_none=True)
        _positive("target_norm", self.target_norm, allow_none=True)
        _positive("teacher_temperature", self.teacher_temperature)
        _positive("student_temperature", self.student_temperature)
        _non_negative("beta", self.beta)
        _non_negative("lr", self.lr)
        _non_negative("weight_decay", self.weight_decay)
        _positive("grad_clip", self.grad_clip, allow_none=True)
        _count("steps", self.steps, minimum=0)
        _count("batch_size", self.batch_size, minimum=1)
        _count("log_every", self.log_every, minimum=1)
        if self.num_unlabeled is not None:
            _count("num_unlabeled", self.num_unlabeled, minimum=1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def resolve_kappa(self, norm: float) -> float:
        """κ for a task vector of L2 norm ``norm``."""
        if self.kappa is not None:
            if self.kappa > 1:
                log.warning("kappa=%.3g > 1 stretches the task vector; the paper finds this degrades accuracy",
                            self.kappa)
            return float(self.kappa)
        if self.target_norm is not None:
            return _shrink_factor(self.target_norm, norm)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not _is_number(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def _count(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _shrink_factor(target: float, norm: float) -> float:
    """target / norm clipped to at most 1; a zero vector is left alone."""
    return 1.0 if norm <= 0 else min(1.0, target / norm)


# --------------------------------------------------------------------------------------------- κ policy


def kappa_policy(norms: Mapping[str, float], target: str | float = "min", *,
                 kappa: float | None = None) -> dict[str, float]:
    """κ_t per task: ``target / ‖τ_t‖`` clipped to ≤ 1 (shrink, never stretch).

    ``target="min"`` (default) uses the smallest norm among the tasks being merged; a number is an
    explicit target norm. ``kappa`` overrides both and gives every task that κ.
    """
    if not norms:
        raise ConfigError("kappa_policy needs at least one task-vector norm")
    for name, norm in norms.items():
        if not _is_number(norm) or norm < 0:
            raise ConfigError(f"norm of task {name!r} must be a finite number >= 0, got {norm!r}")
    if kappa is not None:
        _positive("kappa", kappa)
        return {name: float(kappa) for name in norms}
    if target == "min":
        target_norm = min(norms.values())
    elif _is_number(target) and target > 0:
        target_norm = float(target)
    else:
        raise ConfigError(f"target must be 'min' or a norm > 0, got {target!r}")
    return {name: _shrink_factor(target_norm, norm) for name, norm in norms.items()}


# --------------------------------------------------------------------------------------------- result


@dataclass
class ConditioningResult:
    """The conditioned vector τ', the logged history and the quantities that describe the run."""

    vector: TaskVector
    history: list[dict[str, float]]
    kappa: float
    original_norm: float
    anchor_norm: float
    final_norm: float
    teacher_forward_passes: int
    teacher_cache_hits: int
    teacher_mean_max_prob: float | None  # over the cached teacher logits; None when not cached
    teacher_mean_entropy: float | None
    config: DistacConfig

    def to_dict(self) -> dict[str, Any]:
        """Everything but the vector, JSON-ready."""
        return {"kappa": self.kappa, "original_norm": self.original_norm, "anchor_norm": self.anchor_norm,
                "final_norm": self.final_norm, "teacher_forward_passes": self.teacher_forward_passes,
                "teacher_cache_hits": self.teacher_cache_hits,
                "teacher_mean_max_prob": self.teacher_mean_max_prob,
                "teacher_mean_entropy": self.teacher_mean_entropy,
                "config": self.config.to_dict(), "history": self.history}


# --------------------------------------------------------------------------------------------- helpers


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_temperature: float, student_temperature: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """T_tcr·T_stu · KL(softmax(z_t/T_tcr) ‖ softmax(z_s/T_stu)), averaged over the batch.

    With ``mask`` (token-level logits [batch, length, vocab] of a causal LM, mask [batch, length]) the KL of
    every non-padding position is summed over the sequence, then averaged over the sequences."""
    log_student = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / teacher_temperature, dim=-1)
    if mask is None:
        kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    else:
        per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1)
        kl = (per_position * mask.to(per_position.dtype)).sum() / student_logits.shape[0]
    return teacher_temperature * student_temperature * kl


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is None:
        return float(values.float().mean())
    weights = mask.to(torch.float32)
    return float((values.float() * weights).sum() / weights.sum().clamp(min=1))


def prediction_stats(logits: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean max softmax probability and mean entropy (nats) at temperature 1 (over ``mask``'s positions)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(dim=-1)
    return _masked_mean(probs.max(dim=-1).values, mask), _masked_mean(entropy, mask)


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The fraction of inputs (positions, for a causal LM) where student and teacher predict the same class."""
    return _masked_mean(student_logits.argmax(-1) == teacher_logits.argmax(-1), mask)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _check_keys(model: TaskModel, pretrained: Mapping[str, torch.Tensor], task_vector: TaskVector) -> None:
    backbone = model.backbone.state_dict()
    for key in task_vector:
        if key not in backbone:
            raise MismatchError(f"task vector tensor {key!r} is not a parameter of the model's backbone")
        if key not in pretrained:
            raise MismatchError(f"task vector tensor {key!r} is missing from the pretrained weights")
        for name, shape in (("model backbone", backbone[key].shape), ("pretrained weights", pretrained[key].shape)):
            if shape != task_vector[key].shape:
                raise MismatchError(f"tensor {key!r}: shape {tuple(task_vector[key].shape)} in the task "
                                    f"vector, {tuple(shape)} in the {name}")


def _load_delta(model: TaskModel, pretrained: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> None:
    """Set the backbone's covered tensors to θ_pre + delta (other backbone tensors are left as they are)."""
    own = model.backbone.state_dict()
    with torch.no_grad():
        for key, value in delta.items():
            target = own[key]
            target.copy_((pretrained[key].to(target.device, torch.float32)
                          + value.to(target.device, torch.float32)).to(target.dtype))


def _select_unlabeled(unlabeled: Sequence[Any], config: DistacConfig) -> Sequence[Any]:
    """All inputs (not copied, so a lazy dataset view stays lazy) or a seeded subset of num_unlabeled."""
    if len(unlabeled) == 0:
        raise ConfigError("DisTaC needs unlabeled inputs of the task; got none")
    count = len(unlabeled) if config.num_unlabeled is None else config.num_unlabeled
    if count > len(unlabeled):
        log.warning("num_unlabeled=%d but only %d inputs are available; using all", count, len(unlabeled))
        count = len(unlabeled)
    if count == len(unlabeled):
        return unlabeled
    order = torch.randperm(len(unlabeled), generator=torch.Generator().manual_seed(config.seed))
    return [unlabeled[i] for i in order[:count].tolist()]


class _BatchSampler:
    """Seeded epoch-wise shuffling: every input is seen once per epoch, in a fresh order each epoch.

    With ``lengths`` (length bucketing), each epoch's shuffled order is cut into windows of
    ``BUCKET_WINDOW`` batches, each window is sorted by length and cut into batches, and the epoch's
    batches are shuffled: a batch holds inputs of similar length, so it pads (and computes) little.
    """

    def __init__(self, size: int, batch_size: int, seed: int, lengths: torch.Tensor | None = None):
        self.size, self.batch_size = size, min(batch_size, size)
        self.lengths = lengths
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = self._epoch(), 0

    def _epoch(self) -> torch.Tensor:
        order = torch.randperm(self.size, generator=self.generator)
        if self.lengths is None:
            return order
        usable = self.size - self.size % self.batch_size
        window = BUCKET_WINDOW * self.batch_size
        batches = []
        for start in range(0, usable, window):
            chunk = order[start:min(start + window, usable)]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches += list(chunk.split(self.batch_size))
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        return torch.cat([batches[i] for i in shuffled])

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = self._epoch(), 0
        batch = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch


class _Inputs:
    """The unlabeled inputs as model inputs, collated (tokenised, preprocessed) once and kept on the device.

    A batch is rows of the stored tensors. Text is stored padded to the whole set's longest sequence and each
    batch is cut back to its own longest (right padding: the attention mask's last non-zero column), which is
    exactly what collating the batch on its own gives, so results are unchanged. Sets whose collated size
    would pass ``max_bytes`` (estimated from the first batch), and collates that return anything but
    per-example tensors, fall back to collating every batch as it is drawn.
    """

    def __init__(self, examples: Sequence[Any], collate: Collate, device: torch.device, batch_size: int,
                 max_bytes: int = INPUT_CACHE_BYTES):
        self.examples, self.collate, self.device = examples, collate, device
        self.stored: dict[str, torch.Tensor] | None = None
        probe = collate(examples[:batch_size])
        per_example = sum(v.nelement() * v.element_size() for v in probe.values()
                          if isinstance(v, torch.Tensor)) / min(batch_size, len(examples))
        if per_example * len(examples) <= max_bytes:
            stored = collate(list(examples)) if len(examples) > batch_size else probe
            if all(isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == len(examples)
                   for v in stored.values()):
                self.stored = {k: v.to(device) for k, v in stored.items()}
        self.mask = self.stored.get("attention_mask") if self.stored is not None else None
        if self.mask is not None and (self.mask.ndim != 2 or bool((self.mask[:, 1:] > self.mask[:, :-1]).any())):
            self.mask = None  # not a right-padded [N, L] mask: never cut

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> torch.Tensor | None:
        """Each input's sequence length (on the CPU), or None when there is nothing to cut."""
        return None if self.mask is None else self.mask.sum(dim=1).cpu()

    def by_length(self) -> torch.Tensor:
        """Positions sorted by sequence length (stable; the identity order when there is nothing to cut)."""
        lengths = self.lengths()
        return torch.arange(len(self)) if lengths is None else torch.sort(lengths, stable=True).indices

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs for the examples at ``index`` (positions in the selected set), on the device."""
        if self.stored is None:
            return _to_device(self.collate([self.examples[i] for i in index.tolist()]), self.device)
        rows = index.to(self.device)
        inputs = {k: v.index_select(0, rows) for k, v in self.stored.items()}
        if self.mask is not None:
            length = max(1, int(self.mask.index_select(0, rows).sum(dim=1).max()))
            width = self.mask.shape[1]
            inputs = {k: v[:, :length] if v.ndim >= 2 and v.shape[1] == width else v for k, v in inputs.items()}
        return inputs


class _Teacher:
    """The fine-tuned model's logits for a minibatch: looked up in a cache filled once over the whole
    unlabeled set (in length-sorted chunks), or (``cache_teacher=False``) computed by a frozen copy on
    every step.

    Token-level outputs (a causal LM: [length, vocab] per input) are never cached: a 32k vocabulary over 256
    positions is 32 MB per input. The frozen teacher recomputes them per batch, one forward pass without
    gradients per step, so the KD loss is exact (no top-k truncation error)."""

    def __init__(self, model: TaskModel, inputs: _Inputs, config: DistacConfig):
        """``model`` must hold θ_pre + τ and be in eval mode."""
        self.device = inputs.device
        self.forward_passes, self.cache_hits = 0, 0
        self.cache: torch.Tensor | None = None
        self.frozen: TaskModel | None = None
        self.token_level = token_level(model)
        if config.cache_teacher and self.token_level:
            log.info("DisTaC on token-level outputs: the teacher is recomputed per batch (exact KD, no cache)")
        if config.cache_teacher and not self.token_level:
            order = inputs.by_length()  # similar lengths share a chunk: little padding to compute through
            with torch.no_grad():
                chunks = []
                for start in range(0, len(inputs), config.batch_size):
                    with _autocast(self.device):
                        batch = inputs.batch(order[start:start + config.batch_size])
                        chunks.append(model.distillation_outputs(batch)[0].float())
                    self.forward_passes += 1
            self.cache = torch.empty_like(torch.cat(chunks))
            self.cache[order.to(self.device)] = torch.cat(chunks)
        else:
            self.frozen = copy.deepcopy(model).requires_grad_(False)

    def __call__(self, index: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.cache is not None:
            self.cache_hits += 1
            return self.cache[index.to(self.device)]
        self.forward_passes += 1
        with torch.no_grad(), _autocast(self.device):
            return self.frozen.distillation_outputs(inputs)[0].float()


def token_level(model: TaskModel) -> bool:
    """Whether the model distils next-token distributions (a causal LM) rather than class logits."""
    return type(model).distillation_outputs is not TaskModel.distillation_outputs


def _probed(probe: Probe, model: TaskModel) -> dict[str, float]:
    """The probe's measurements of the current student, as plain floats, with gradients off."""
    with torch.no_grad():
        return {name: float(value) for name, value in probe(model).items()}


@contextlib.contextmanager
def _backbone_training(model: TaskModel):
    """Freeze the head and put the model in eval mode (no dropout) for the run; restore both afterwards."""
    head_flags = [p.requires_grad for p in model.head.parameters()]
    was_training = model.training
    model.head.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in zip(model.head.parameters(), head_flags):
            p.requires_grad_(flag)
        model.train(was_training)


class _Anchored:
    """The trained tensors θ with their anchor θ_0, and κτ for every key of τ.

    The β‖θ − θ_0‖² term is handled here, outside autograd: its gradient 2β(θ − θ_0) is added to ``.grad``
    with fused multi-tensor ops (the same float operations autograd performs, so the same bits), and its
    value is computed only when logged. On a 22 M-parameter encoder this saves building and back-propagating
    a graph over every tensor on every step.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], anchor_delta: Mapping[str, torch.Tensor]):
        self.keys = list(params)
        self.params = [params[k] for k in self.keys]
        self.anchors = [p.detach().clone() for p in self.params]
        self.deltas = [anchor_delta[k] for k in self.keys]
        # κτ of the keys that do not train (buffers, frozen tensors) is constant: its squared norm once
        self.fixed_sq = sum(float(v.double().pow(2).sum()) for k, v in anchor_delta.items() if k not in params)

    def displacement(self) -> list[torch.Tensor]:
        """θ − θ_0 per tensor (new tensors)."""
        return torch._foreach_sub([p.detach() for p in self.params], self.anchors)

    def add_gradient(self, beta: float, displacement: list[torch.Tensor]) -> None:
        """.grad += 2β(θ − θ_0), consuming ``displacement``; a tensor without a gradient gets just this term."""
        if beta == 0:
            return
        torch._foreach_mul_(displacement, 2 * beta)
        have = [(p.grad, d) for p, d in zip(self.params, displacement) if p.grad is not None]
        for p, d in zip(self.params, displacement):
            if p.grad is None:
                p.grad = d
        if have:
            torch._foreach_add_([g for g, _ in have], [d for _, d in have])

    @staticmethod
    def squared_norm(tensors: list[torch.Tensor]) -> float:
        """Σ‖t‖², accumulated in float64 (a float32 sum over 10 M entries drifts by ~1e-4 relative)."""
        return sum(float(n) ** 2 for n in torch._foreach_norm(tensors, dtype=torch.float64)) if tensors else 0.0

    def delta_norm(self) -> float:
        """‖τ'‖ = ‖κτ + (θ − θ_0)‖ without materializing τ' on the host."""
        values = self.displacement()
        torch._foreach_add_(values, self.deltas)
        return math.sqrt(self.squared_norm(values) + self.fixed_sq)

    def conditioned(self, anchor_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """τ' = κτ + (θ − θ_0) for the trained keys, exactly κτ for the others."""
        out = dict(anchor_delta)
        moved = self.displacement()
        torch._foreach_add_(moved, self.deltas)
        out.update(zip(self.keys, moved))
        return out


def _optimizer(params: list[torch.nn.Parameter], config: DistacConfig) -> torch.optim.Optimizer:
    """Adam, fused (one kernel over all tensors; CPU and CUDA) where this torch supports it, else foreach."""
    try:
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, ValueError) as exc:
        log.debug("fused Adam unavailable (%s); using foreach", exc)
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


# --------------------------------------------------------------------------------------------- DisTaC


def condition(model: TaskModel, pretrained: Mapping[str, torch.Tensor], task_vector: TaskVector,
              unlabeled: Sequence[Any], collate: Collate, config: DistacConfig | None = None, *,
              progress: bool = True, on_log: LogCallback | None = None,
              probe: Probe | None = None) -> ConditioningResult:
    """Run DisTaC on one task and return the conditioned task vector τ'.

    ``model`` carries the task's head (frozen here); its backbone weights are overwritten, and on return it
    holds the trained student. ``pretrained`` is θ_pre (at least the keys of ``task_vector``), ``unlabeled``
    the task's inputs (labels, if any, are never used) and ``collate`` turns a list of them into model
    inputs. Each history entry describes one logged optimizer step: the minibatch's losses and student
    statistics (at the weights the step started from) and ‖τ'‖ after the step.

    ``probe(model)``, when given, measures the student at the anchor (a step-0 history entry) and at every
    logged step, e.g. its validation accuracy, so convergence can be plotted; its numbers join the entry.
    """
    config = config or DistacConfig()
    _check_keys(model, pretrained, task_vector)
    examples = _select_unlabeled(unlabeled, config)
    device = next(model.parameters()).device
    original_norm = task_vector.norm()
    kappa = config.resolve_kappa(original_norm)
    anchor_delta = {k: (kappa * v.float()).to(device) for k, v in task_vector.items()}

    with _backbone_training(model):
        inputs = _Inputs(examples, collate, device, config.batch_size)
        _load_delta(model, pretrained, task_vector)
        teacher = _Teacher(model, inputs, config)
        _load_delta(model, pretrained, anchor_delta)
        named = dict(model.backbone.named_parameters())
        params = {k: named[k] for k in task_vector if k in named and named[k].requires_grad}
        if not params:
            raise MismatchError("none of the task vector's tensors is a trainable backbone parameter")
        anchored = _Anchored(params, anchor_delta)
        history = _distill(model, anchored, teacher, inputs, config, progress, on_log, probe)

    with torch.no_grad():
        conditioned = anchored.conditioned(anchor_delta)
        vector = TaskVector({key: conditioned[key].to(device="cpu", dtype=value.dtype)
                             for key, value in task_vector.items()})
    teacher_stats = prediction_stats(teacher.cache) if teacher.cache is not None else (None, None)
    result = ConditioningResult(
        vector=vector, history=history, kappa=kappa, original_norm=original_norm,
        anchor_norm=kappa * original_norm, final_norm=vector.norm(), teacher_forward_passes=teacher.forward_passes,
        teacher_cache_hits=teacher.cache_hits, teacher_mean_max_prob=teacher_stats[0],
        teacher_mean_entropy=teacher_stats[1], config=config)
    log.info("DisTaC: κ=%.4g, ‖τ‖ %.4g → anchor %.4g → ‖τ'‖ %.4g after %d steps", kappa, original_norm,
             result.anchor_norm, result.final_norm, config.steps)
    return result


def _distill(model: TaskModel, anchored: _Anchored, teacher: _Teacher, inputs: _Inputs, config: DistacConfig,
             progress: bool, on_log: LogCallback | None, probe: Probe | None) -> list[dict[str, float]]:
    """The optimization loop: Adam on KD + β‖θ − θ_0‖² over the anchored tensors; returns the logged history."""
    optimizer = _optimizer(anchored.params, config)
    lengths = inputs.lengths() if config.length_bucketing else None
    sampler = _BatchSampler(len(inputs), config.batch_size, config.seed, lengths)
    history: list[dict[str, float]] = []
    if probe is not None:
        history.append({"step": 0, "norm": anchored.delta_norm(), **_probed(probe, model)})
        if on_log is not None:
            on_log(0, dict(history[-1]))
    for step in tqdm(range(1, config.steps + 1), desc="DisTaC", unit="step", disable=not progress):
        logged = step % config.log_every == 0 or step == config.steps
        index = sampler.next()
        batch = inputs.batch(index)
        target = teacher(index, batch)
        with _autocast(teacher.device):
            student, mask = model.distillation_outputs(batch)
        kd = distillation_loss(student, target, config.teacher_temperature, config.student_temperature, mask)
        optimizer.zero_grad(set_to_none=True)
        kd.backward()
        if config.beta > 0 or logged:
            displacement = anchored.displacement()
            reg = anchored.squared_norm(displacement) if logged else 0.0
            anchored.add_gradient(config.beta, displacement)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(anchored.params, config.grad_clip)
        optimizer.step()
        if logged:
            max_prob, entropy = prediction_stats(student.detach(), mask)
            kd_value = float(kd.detach())
            metrics = {"step": step, "loss": kd_value + config.beta * reg, "kd_loss": kd_value, "reg_loss": reg,
                       "norm": anchored.delta_norm(), "student_entropy": entropy, "student_max_prob": max_prob,
                       "teacher_agreement": agreement(student.detach(), target, mask)}
            if probe is not None:
                metrics.update(_probed(probe, model))
            history.append(metrics)
            if on_log is not None:
                on_log(step, dict(metrics))
    return history
