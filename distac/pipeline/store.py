"""The run store: where each stage instance's outputs live under the storage root, and typed readers and
writers for them (local paths and ``s3://`` alike, through ``distac.io``).

Layout: one folder per stage instance, named by its key (``distac.pipeline.table.StageRef.key``)::

    pretrained/                       model/ (backbone/, meta.json)
    finetune/<task>/                  model/ (backbone/, head.safetensors, meta.json), metrics.json,
                                      history.json, validation_logits.safetensors
    extract/<task>/                   task_vector.safetensors, stats.json
    diagnose/                         diagnosis.json (incl. the tasks to condition), diagnosis.md
    condition/<task>/                 summary.json; if conditioned: task_vector.safetensors, history.json
    merge/<method>/<variant>/         merged/ (the merged-model format of distac.merging.streaming); for a
                                      distac merge when DisTaC conditioned no task only merged/merge.json
                                      = {"identical_to": "as-is", …}
    evaluate/<method>/<variant>/      evaluation.json (then only {"identical_to": "as-is"})
    report/                           results.md, results.csv, results.png, plot.csv, metrics.json

Each folder ends with ``_done.json`` (the manifest), written last.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import torch

from distac import io
from distac.errors import CheckpointError, ConfigError
from distac.merging import Merged
from distac.merging.streaming import RECORD_NAME, load_merged, read_record, staged_directory
from distac.models.store import LoadedModel, backbone_uri, load_head, load_task_model
from distac.pipeline.params import PipelineParams
from distac.pipeline.table import StageRef
from distac.vectors import TaskVector

MANIFEST = "_done.json"
VECTOR_FILE = "task_vector.safetensors"
LOGITS_FILE = "validation_logits.safetensors"
MODEL_DIR = "model"
MERGED_DIR = "merged"


_SECRET_QUERY = re.compile(r"(?i)((?:password|passwd|secret|token|key|signature)[^=&]*=)[^&]*")


def redact(uri: str) -> str:
    """The URI without credentials (``user:pass@`` and secret-looking query values), for logs and tags."""
    try:
        parts = urlsplit(str(uri))
    except ValueError:
        return "<unparseable URI>"
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = _SECRET_QUERY.sub(r"\1***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return str(uri)  # untouched (urlunsplit would also drop the empty authority of sqlite:////path)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class RunStore:
    """One storage root's stage outputs."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")

    @classmethod
    def of(cls, params: PipelineParams) -> "RunStore":
        return cls(params.storage.root)

    def dir(self, made: StageRef) -> str:
        """The instance's folder; its key is checked when the StageRef is made (no '..', no '/')."""
        return io.join_uri(self.root, made.key)

    def file(self, made: StageRef, name: str) -> str:
        return io.join_uri(self.dir(made), name)

    def exists(self, uri: str) -> bool:
        fs, path = io.url_to_fs(uri)
        return fs.exists(path)

    # ----------------------------------------------------------------------------------- manifests

    def manifest(self, made: StageRef) -> dict[str, Any] | None:
        """The instance's ``_done.json``, or None when it has not finished."""
        uri = self.file(made, MANIFEST)
        if not self.exists(uri):
            return None
        try:
            manifest = io.read_json(uri)
        except CheckpointError:
            return None
        return manifest if isinstance(manifest, dict) else None

    def write_manifest(self, made: StageRef, manifest: dict[str, Any]) -> None:
        io.write_json(manifest, self.file(made, MANIFEST))

    def clear_manifest(self, made: StageRef) -> None:
        """Mark the instance unfinished before it is (re)computed."""
        fs, path = io.url_to_fs(self.file(made, MANIFEST))
        if fs.exists(path):
            fs.rm(path)

    def files(self, made: StageRef) -> Iterator[tuple[str, str]]:
        """(path relative to the instance folder, absolute URI) of every file, the manifest excluded."""
        fs, base = io.url_to_fs(self.dir(made))
        if not fs.exists(base):
            return
        prefix = "s3://" if not io.is_local(self.root) else ""
        for path in sorted(fs.find(base)):
            relative = path[len(base.rstrip("/")):].lstrip("/")
            if relative != MANIFEST:
                yield relative, prefix + path

    # ----------------------------------------------------------------------------------- generic

    def read_json(self, made: StageRef, name: str) -> Any:
        return io.read_json(self.file(made, name))

    def write_json(self, made: StageRef, name: str, value: Any) -> None:
        io.write_json(value, self.file(made, name))

    def write_text(self, made: StageRef, name: str, text: str | bytes) -> None:
        io.write_bytes_atomic(text.encode() if isinstance(text, str) else text, self.file(made, name))

    # ----------------------------------------------------------------------------------- pretrained, finetune

    def pretrained_uri(self) -> str:
        return self.file(StageRef("pretrained"), MODEL_DIR)

    def pretrained_backbone(self) -> dict[str, torch.Tensor]:
        return io.load_state_dict(backbone_uri(self.pretrained_uri()))

    def model_uri(self, task: str) -> str:
        """The fine-tuned model directory of a task (``distac.models.store`` format)."""
        return self.file(StageRef("finetune", task=task), MODEL_DIR)

    def task_model(self, task: str) -> LoadedModel:
        return load_task_model(self.model_uri(task))

    def head(self, task: str) -> dict[str, torch.Tensor]:
        return load_head(self.model_uri(task))

    def finetune_metrics(self, task: str) -> dict[str, Any]:
        return self.read_json(StageRef("finetune", task=task), "metrics.json")

    def finetuned_accuracy(self, tasks: list[str], split: str) -> dict[str, float]:
        """Each task's fine-tuned model's accuracy on ``split`` (validation or test)."""
        return {t: self.finetune_metrics(t)[f"{split}_accuracy"] for t in tasks}

    def validation_logits(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        state = io.load_state_dict(self.file(StageRef("finetune", task=task), LOGITS_FILE))
        return state["logits"], state["labels"]

    def confidence_logits(self, task: str) -> torch.Tensor:
        """The logits the diagnosis reads a source's confidence from: a causal LM's next-token logits after each
        validation prompt, a classifier's validation logits."""
        state = io.load_state_dict(self.file(StageRef("finetune", task=task), LOGITS_FILE))
        return state.get("confidence_logits", state["logits"])

    def save_validation_logits(self, task: str, logits: torch.Tensor, labels: torch.Tensor,
                               confidence_logits: torch.Tensor | None = None) -> None:
        state = {"logits": logits, "labels": labels}
        if confidence_logits is not None:
            state["confidence_logits"] = confidence_logits
        io.save_state_dict(state, self.file(StageRef("finetune", task=task), LOGITS_FILE))

    # ----------------------------------------------------------------------------------- vectors

    def task_vector(self, task: str) -> TaskVector:
        """The extracted (as fine-tuned) task vector."""
        return TaskVector.load(self.file(StageRef("extract", task=task), VECTOR_FILE))

    def vector_stats(self, task: str) -> dict[str, Any]:
        return self.read_json(StageRef("extract", task=task), "stats.json")

    def condition_summary(self, task: str) -> dict[str, Any]:
        return self.read_json(StageRef("condition", task=task), "summary.json")

    def conditioned_vector(self, task: str) -> TaskVector | None:
        """The DisTaC-conditioned vector, or None when the diagnosis did not select the task."""
        made = StageRef("condition", task=task)
        return TaskVector.load(self.file(made, VECTOR_FILE)) if self.condition_summary(task)["conditioned"] else None

    def any_conditioned(self, tasks: list[str]) -> bool:
        """Whether the finished condition stages conditioned any of ``tasks``."""
        return any(self.condition_summary(task)["conditioned"] for task in tasks)

    def merge_input(self, task: str, variant: str) -> TaskVector:
        """What a merge of ``variant`` takes for a task: its conditioned vector (distac, when conditioned),
        else the extracted one."""
        if variant == "distac":
            conditioned = self.conditioned_vector(task)
            if conditioned is not None:
                return conditioned
        elif variant != "as-is":
            raise ConfigError(f"unknown variant {variant!r}")
        return self.task_vector(task)

    # ----------------------------------------------------------------------------------- diagnose

    def diagnosis(self) -> dict[str, Any]:
        return self.read_json(StageRef("diagnose"), "diagnosis.json")

    def conditioned_tasks(self) -> list[str]:
        """The tasks the finished diagnose stage selected for DisTaC."""
        return self.diagnosis()["conditioned_tasks"]

    # ----------------------------------------------------------------------------------- merge, evaluate

    def merged_uri(self, method: str, variant: str) -> str:
        return self.file(StageRef("merge", method=method, variant=variant), MERGED_DIR)

    def identical_to(self, method: str, variant: str) -> str | None:
        """The variant this merge is the same as and was not computed for (DisTaC conditioned no task), else
        None."""
        uri = io.join_uri(self.merged_uri(method, variant), RECORD_NAME)
        record = io.read_json(uri) if self.exists(uri) else None
        return record.get("identical_to") if isinstance(record, dict) else None

    def mark_identical(self, method: str, variant: str, same_as: str) -> None:
        """Record, in place of a merge, that this variant is ``same_as``'s merge (an earlier merge is replaced).
        The record holds no merge, so ``distac materialize`` refuses it as one."""
        note = f"not merged: the same vectors as the {same_as} merge (DisTaC conditioned no task)"
        with staged_directory(self.merged_uri(method, variant), kind="merge") as staging:
            io.write_json({"identical_to": same_as, "variant": variant, "note": note},
                          os.path.join(staging, RECORD_NAME))

    def merged(self, method: str, variant: str) -> Merged:
        """The merged model; a variant that was not merged because it is another's gives that one."""
        return load_merged(self.merged_uri(method, self.identical_to(method, variant) or variant))

    def merge_record(self, method: str, variant: str) -> dict[str, Any]:
        return read_record(self.merged_uri(method, self.identical_to(method, variant) or variant))

    def evaluation(self, method: str, variant: str) -> dict[str, Any]:
        return self.read_json(StageRef("evaluate", method=method, variant=variant), "evaluation.json")

    # ----------------------------------------------------------------------------------- report

    def report_file(self, name: str) -> str:
        return self.file(StageRef("report"), name)
