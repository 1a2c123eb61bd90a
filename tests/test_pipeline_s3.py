"""The flow with its storage root on S3 (moto's real S3 server on loopback): every stage reads and writes
through s3fs, the manifests make a second run skip everything, and the outputs are real objects."""

from __future__ import annotations

import json

import fsspec

from flows.pipeline import distac_pipeline

SHAPE = {"tasks": [{"name": "cola"}, {"name": "mrpc", "finetune": {"lr": 1.0e-2}}],
         "merge": {"alpha_grid": [0.5, 1.0], "methods": [{"name": "task_arithmetic", "alpha": "search"}]}}


def test_flow_with_storage_on_s3_runs_then_skips(s3_bucket, make_tiny_params, tmp_path):
    root = f"{s3_bucket}/runs/tiny"
    path = make_tiny_params(tmp_path, storage={"root": root}, **SHAPE)
    first = distac_pipeline(path)
    assert first["stages"] and all(not s["skipped"] for s in first["stages"])

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    prefix = root.removeprefix("s3://")
    assert fs.exists(f"{prefix}/finetune/mrpc/model/backbone/model.safetensors")
    assert fs.exists(f"{prefix}/extract/cola/task_vector.safetensors")
    assert fs.exists(f"{prefix}/merge/task_arithmetic/distac/merged/merge.json")
    metrics = json.loads(fs.cat_file(f"{prefix}/report/metrics.json"))
    assert set(metrics) == {"individual/fine-tuned", "task_arithmetic/as-is", "task_arithmetic/distac"}
    assert fs.cat_file(f"{prefix}/report/results.png")[:4] == b"\x89PNG"
    assert not [p for p in fs.find(prefix) if ".distac-tmp" in p]

    second = distac_pipeline(path)
    assert all(s["skipped"] for s in second["stages"])
    assert second["report"]["table"] == first["report"]["table"]
