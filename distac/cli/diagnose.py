"""``distac diagnose``: norm and confidence diagnostics of the source models, before merging.

FT may be any model form (distac model directory, Hugging Face checkpoint directory or hub id, raw
checkpoint). A model whose task data is known (``--data``, or the task in its meta.json) gets the full
diagnosis: confidence on unlabeled training inputs (or ``--unlabeled FILE``), accuracy and ECE on the
validation split: the data spec's ``validation`` file when it gives one, else a seeded hold-out of the
training data, which a checkpoint trained on the whole file has seen (the report names which). A causal LM
with ``--unlabeled`` texts and no task data gets norms, cosines and its confidence: the mean max next-token
probability over every token of the texts. Anything else (a raw checkpoint, a task distac does not know)
falls back to norms and cosines.
Prints a markdown table and the recommendations; ``--json`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from distac import io
from distac.calibration import ConfidenceStats
from distac.cli.common import add_data_arguments, data_specs, task_data
from distac.cli.extract import set_threads
from distac.conditioning import token_level
from distac.diagnostics import (CONFIDENCE_THRESHOLD, HOLD_OUT, NORM_RATIO_THRESHOLD, TARGET_CONFIDENCE, Diagnosis,
                                diagnose, text_confidence_stats)
from distac.errors import ConfigError, DistacError
from distac.evaluation import labels_of, predict_logits
from distac.vectors import TaskVector

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("diagnose", help="norm / confidence diagnostics and DisTaC recommendations",
                                   description=__doc__)
    parser.add_argument("--pretrained", required=True,
                        help="θ_pre: distac or HF model directory, hub id, model spec (.json) or checkpoint")
    parser.add_argument("--finetuned", required=True, nargs="+", help="fine-tuned models (any form), one per task")
    parser.add_argument("--names", nargs="+", help="task names in the order of --finetuned (default: from meta)")
    parser.add_argument("--json", help="write the diagnosis as JSON here")
    parser.add_argument("--markdown", help="write the markdown report here")
    parser.add_argument("--num-unlabeled", type=int, default=512, help="unlabeled inputs per task")
    parser.add_argument("--max-eval", type=int, default=512, help="validation examples per task (for ECE)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_data_arguments(parser, several=True)
    parser.add_argument("--unlabeled", nargs="+", metavar="FILE",
                        help="inputs to read confidence on (.csv/.tsv/.jsonl/.parquet or a datasets directory; "
                             "labels not needed), one file for all models or one per --finetuned model, instead "
                             "of the task's training inputs; for a causal LM without task data: texts, its "
                             "confidence read over every token")
    parser.add_argument("--text-column", default="text", help="text column of --unlabeled (default: text)")
    parser.add_argument("--text-pair-column", help="second-sentence column of --unlabeled, for sentence pairs")
    parser.add_argument("--norm-ratio-threshold", type=float, default=NORM_RATIO_THRESHOLD)
    parser.add_argument("--confidence-threshold", type=float, default=CONFIDENCE_THRESHOLD,
                        help="flag scaled confidence (max-prob − 1/C)/(1 − 1/C) below this")
    parser.add_argument("--target-confidence", type=float, default=TARGET_CONFIDENCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.set_defaults(func=run)


def _task_names(args: argparse.Namespace, tasks: list[str | None]) -> list[str]:
    if args.names:
        if len(args.names) != len(args.finetuned):
            raise ConfigError(f"--names gives {len(args.names)} names for {len(args.finetuned)} models")
        names = list(args.names)
    else:
        names = [task or os.path.basename(str(uri).rstrip("/")) for task, uri in zip(tasks, args.finetuned)]
    if len(set(names)) != len(names):  # the same task fine-tuned twice: number them
        names = [f"{name}#{i}" for i, name in enumerate(names)]
    return names


@dataclass
class Measured:
    """What running one source model gave: its task and whichever confidence and validation outputs apply."""

    task: str | None = None
    confidence_logits: torch.Tensor | None = None  # [N, C] (a causal LM: [N, vocab] after each prompt)
    text_confidence: ConfidenceStats | None = None  # a causal LM on free text, over every token
    validation: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, labels)
    validation_split: str | None = None


def validation_split_name(spec: Any) -> str:
    """``"validation"`` when the data spec gives a validation split, else ``HOLD_OUT`` (a seeded hold-out of
    the training data: built-in tasks, and specs without one)."""
    from distac.data import DataSpec

    if isinstance(spec, DataSpec) and (spec.validation if spec.dataset is None else "validation" in spec.splits):
        return "validation"
    return HOLD_OUT


def unlabeled_files(args: argparse.Namespace, count: int) -> list[list | None]:
    """Each model's --unlabeled inputs (one file for all models or one per model), subsampled; None without."""
    from distac.cli.condition import read_unlabeled_file
    from distac.data.examples import subsample

    paths = args.unlabeled or []
    if len(paths) not in (0, 1, count):
        raise ConfigError(f"--unlabeled gives {len(paths)} files for {count} models: give one for all of them or "
                          "one per --finetuned model")
    read = {path: subsample(read_unlabeled_file(path, args.text_column, args.text_pair_column),
                            args.num_unlabeled, f"unlabeled-{args.seed}") for path in dict.fromkeys(paths)}
    if not paths:
        return [None] * count
    return [read[paths[0]]] * count if len(paths) == 1 else [read[path] for path in paths]


def plain_text_collate(adapter: Any):
    """The adapter's collate without its prompt template: free text is read as it is, not as a task's prompt."""
    if getattr(adapter, "template", None) is None:
        return adapter.collate
    plain = copy.copy(adapter)  # shares the tokenizer; only the template differs
    plain.template = None
    return plain.collate


def measure(args: argparse.Namespace, uri: str, spec: Any, texts: list | None) -> Measured:
    """Run one source model on what it can be diagnosed with; nothing (norms and cosines only) when it cannot."""
    from distac.cli.common import load_model_for
    from distac.models.resolve import model_form

    if model_form(uri) == "checkpoint" and spec is None:
        if texts is not None:
            log.warning("%s is a bare checkpoint and --data gives it no task: --unlabeled is not used for it", uri)
        return Measured()
    loaded = load_model_for(uri, args.pretrained, spec, args)
    data = None
    if spec is not None or loaded.task:
        try:
            data = task_data(loaded, uri, spec, args, max_eval=args.max_eval)
        except DistacError as exc:
            if spec is not None:
                raise
            log.warning("%s: no data for its task %r (%s)", uri, loaded.task, exc)
    model, collate, out = loaded.model, loaded.adapter.collate, Measured(task=loaded.task)
    if data is None and texts is None:
        log.warning("%s: no task data (--data) and no --unlabeled inputs: norms and cosines only", uri)
        return out
    if data is None and token_level(model):  # free text: the next token's confidence at every position
        out.text_confidence = text_confidence_stats(model, texts, plain_text_collate(loaded.adapter),
                                                    args.batch_size)
        return out
    inputs = texts if texts is not None else data.unlabeled(args.num_unlabeled, args.seed)
    out.confidence_logits = predict_logits(model, inputs, collate, args.batch_size, confidence=True)
    if data is not None:
        out.validation = (predict_logits(model, data.validation, collate, args.batch_size),
                          labels_of(data.validation))
        out.validation_split = validation_split_name(spec)
    return out


def build_diagnosis(args: argparse.Namespace) -> Diagnosis:
    """Vectors from the checkpoints; each model run in turn (one in memory at a time); then ``diagnose``."""
    from distac.models.resolve import paired_backbones

    pre_view, model_views = paired_backbones(args.pretrained, args.finetuned)  # mismatches fail here
    pretrained = {key: pre_view[key] for key in pre_view}
    specs = data_specs(args, len(args.finetuned))
    texts = unlabeled_files(args, len(args.finetuned))
    measured = [measure(args, uri, spec, text) for uri, spec, text in zip(args.finetuned, specs, texts)]
    names = _task_names(args, [m.task for m in measured])
    vectors, confidence, text_confidence, validation, splits = {}, {}, {}, {}, {}
    for name, view, item in zip(names, model_views, measured):
        vectors[name] = TaskVector.from_state_dicts({k: pretrained[k] for k in view}, {k: view[k] for k in view})
        if item.confidence_logits is not None:
            confidence[name] = item.confidence_logits
        if item.text_confidence is not None:
            text_confidence[name] = item.text_confidence
        if item.validation is not None:
            validation[name], splits[name] = item.validation, item.validation_split
    return diagnose(vectors, confidence, validation, norm_ratio_threshold=args.norm_ratio_threshold,
                    confidence_threshold=args.confidence_threshold, target_confidence=args.target_confidence,
                    text_confidence=text_confidence, validation_splits=splits)


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    diagnosis = build_diagnosis(args)
    markdown = diagnosis.to_markdown()
    print(markdown)
    if args.json:
        io.write_json(diagnosis.to_dict(), args.json)
    if args.markdown:
        io.write_bytes_atomic((markdown + "\n").encode(), args.markdown)
    return 0
