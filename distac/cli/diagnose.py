"""``distac diagnose``: norm and confidence diagnostics of the source models, before merging.

FT may be any model form (distac model directory, Hugging Face checkpoint directory or hub id, raw
checkpoint). A model whose task data is known (``--data``, or the task in its meta.json) gets the full
diagnosis: confidence on unlabeled training inputs, ECE on the validation split. Anything else (a raw
checkpoint, a task distac does not know) falls back to norms and cosines.
Prints a markdown table and the recommendations; ``--json`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import logging
import os

from distac import io
from distac.cli.common import add_data_arguments, data_specs, task_data
from distac.cli.extract import set_threads
from distac.diagnostics import (CONFIDENCE_THRESHOLD, NORM_RATIO_THRESHOLD, TARGET_CONFIDENCE, Diagnosis,
                                diagnose)
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


def _full_diagnosis_inputs(args: argparse.Namespace, uri: str, spec) -> tuple | None:
    """(loaded model, task data) when this model can be run on its task's data; None means norms only."""
    from distac.cli.common import load_model_for
    from distac.models.resolve import model_form

    if model_form(uri) == "checkpoint" and spec is None:
        return None
    loaded = load_model_for(uri, args.pretrained, spec, args)
    if spec is None and not loaded.task:
        log.warning("%s names no task and --data gives none: norms and cosines only", uri)
        return loaded, None
    try:
        return loaded, task_data(loaded, uri, spec, args, max_eval=args.max_eval)
    except DistacError as exc:
        if spec is not None:
            raise
        log.warning("%s: no data for its task %r (%s): norms and cosines only", uri, loaded.task, exc)
        return loaded, None


def build_diagnosis(args: argparse.Namespace) -> Diagnosis:
    from distac.models.resolve import paired_backbones

    pre_view, model_views = paired_backbones(args.pretrained, args.finetuned)  # mismatches fail here
    pretrained = {key: pre_view[key] for key in pre_view}
    specs = data_specs(args, len(args.finetuned))
    inputs = [_full_diagnosis_inputs(args, uri, spec) for uri, spec in zip(args.finetuned, specs)]
    names = _task_names(args, [item[0].task if item else None for item in inputs])
    vectors, unlabeled_logits, validation = {}, {}, {}
    for name, view, item in zip(names, model_views, inputs):
        vectors[name] = TaskVector.from_state_dicts({k: pretrained[k] for k in view}, {k: view[k] for k in view})
        if item is None or item[1] is None:
            continue
        loaded, data = item
        collate = loaded.adapter.collate
        unlabeled_logits[name] = predict_logits(loaded.model, data.unlabeled(args.num_unlabeled, args.seed),
                                                collate, args.batch_size, confidence=True)
        validation[name] = (predict_logits(loaded.model, data.validation, collate, args.batch_size),
                            labels_of(data.validation))
    return diagnose(vectors, unlabeled_logits, validation, norm_ratio_threshold=args.norm_ratio_threshold,
                    confidence_threshold=args.confidence_threshold, target_confidence=args.target_confidence)


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
