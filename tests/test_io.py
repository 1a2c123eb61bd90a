"""Checkpoint I/O: formats, lazy reads, atomic writes, clear errors, S3."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distac import io
from distac.errors import CheckpointError


@pytest.fixture
def state():
    return {
        "encoder.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "encoder.bias": torch.tensor([1.5, -2.0, 0.25], dtype=torch.float32),
        "half": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
        "position_ids": torch.arange(5),
        "flag": torch.tensor([True, False]),
    }


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.bin", "sharded_dir"])
def test_round_trip_every_format(tmp_path, state, name):
    uri = str(tmp_path / name)
    io.save_state_dict(state, uri, max_shard_bytes=40)
    assert_same(io.load_state_dict(uri), state)


def test_sharded_layout_matches_hugging_face(tmp_path, state):
    io.save_state_dict(state, tmp_path / "ck", max_shard_bytes=40)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert "model.safetensors.index.json" in names
    shards = [n for n in names if n.startswith("model-")]
    assert shards and all(n.endswith(f"-of-{len(shards):05d}.safetensors") for n in shards)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())


def test_one_shard_is_a_single_model_file(tmp_path, state):
    io.save_state_dict(state, tmp_path / "ck")
    assert os.listdir(tmp_path / "ck") == ["model.safetensors"]


def test_reader_is_lazy_and_reports_metadata(tmp_path, state):
    io.save_state_dict(state, tmp_path / "ck", max_shard_bytes=40)
    reader = io.open_checkpoint(tmp_path / "ck")
    assert len(reader) == len(state) and "half" in reader
    assert reader.shape("encoder.weight") == (3, 4)
    assert reader.dtype("half") == torch.bfloat16
    assert reader.numel("encoder.weight") == 12
    assert torch.equal(reader["encoder.bias"], state["encoder.bias"])


def test_nested_torch_checkpoints_are_unwrapped(tmp_path, state):
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ck.pt")
    assert_same(io.load_state_dict(tmp_path / "ck.pt"), state)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope"):
        io.open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        io.open_checkpoint(tmp_path / "nope")


def test_directory_without_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no recognizable checkpoint"):
        io.open_checkpoint(tmp_path / "empty")


def test_truncated_safetensors_is_rejected(tmp_path, state):
    path = tmp_path / "model.safetensors"
    io.save_state_dict(state, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        io.load_state_dict(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        io.open_checkpoint(path)


def test_broken_torch_file_is_rejected(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a zip archive")
    with pytest.raises(CheckpointError, match="bad.pt"):
        io.open_checkpoint(tmp_path / "bad.pt")


def test_index_pointing_at_wrong_shard_is_rejected(tmp_path, state):
    io.save_state_dict(state, tmp_path / "ck", max_shard_bytes=40)
    index_path = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    key = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][key] = second
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=key):
        io.open_checkpoint(tmp_path / "ck")


def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, state):
    target = tmp_path / "ck"
    io.save_state_dict(state, target)
    before = io.load_state_dict(target)
    with pytest.raises(RuntimeError, match="crash"):
        with io.ShardedSafetensorsWriter(target, max_shard_bytes=40) as writer:
            writer.add("a", torch.ones(100))
            writer.add("b", torch.ones(100))
            raise RuntimeError("crash")
    assert_same(io.load_state_dict(target), before)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no staging leftovers


def test_writer_refuses_duplicate_keys(tmp_path):
    with pytest.raises(CheckpointError, match="'a' written twice"):
        with io.ShardedSafetensorsWriter(tmp_path / "ck") as writer:
            writer.add("a", torch.ones(2))
            writer.add("a", torch.ones(2))
    assert not (tmp_path / "ck").exists()


def test_shared_storage_tensors_are_saved(tmp_path):
    base = torch.randn(4, 4)
    io.save_state_dict({"a": base, "tied": base}, tmp_path / "m.safetensors")
    loaded = io.load_state_dict(tmp_path / "m.safetensors")
    assert torch.equal(loaded["a"], loaded["tied"])


def test_json_helpers(tmp_path):
    io.write_json({"b": 1, "a": [1, 2]}, tmp_path / "x.json")
    assert io.read_json(tmp_path / "x.json") == {"a": [1, 2], "b": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="bad.json"):
        io.read_json(tmp_path / "bad.json")


def test_s3_round_trip_sharded_and_single(s3_bucket, state):
    io.save_state_dict(state, f"{s3_bucket}/ck", max_shard_bytes=40)
    reader = io.open_checkpoint(f"{s3_bucket}/ck")
    assert reader.dtype("half") == torch.bfloat16
    assert_same({k: reader[k] for k in reader}, state)
    io.save_state_dict(state, f"{s3_bucket}/one.safetensors")
    assert_same(io.load_state_dict(f"{s3_bucket}/one.safetensors"), state)
    io.save_state_dict(state, f"{s3_bucket}/one.pt")
    assert_same(io.load_state_dict(f"{s3_bucket}/one.pt"), state)


def test_s3_failed_write_uploads_nothing(s3_bucket):
    import fsspec

    with pytest.raises(RuntimeError):
        with io.ShardedSafetensorsWriter(f"{s3_bucket}/crashed", max_shard_bytes=40) as writer:
            writer.add("a", torch.ones(100))
            writer.add("b", torch.ones(100))
            raise RuntimeError("crash")
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/crashed")


# ------------------------------------------------------------------------------- read-path safety, exact bytes


def _write_raw_safetensors(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


@pytest.mark.parametrize("name", ["../outside.safetensors", "<absolute>", "sub/../../x.safetensors"])
def test_index_naming_a_shard_outside_its_directory_is_refused(tmp_path, state, name):
    io.save_state_dict(state, tmp_path / "outside.safetensors")
    if name == "<absolute>":  # an absolute path to a real file outside the checkpoint
        name = str(tmp_path / "outside.safetensors")
    io.save_state_dict(state, tmp_path / "ck", max_shard_bytes=40)
    index_path = tmp_path / "ck" / io.INDEX_FILE_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"]["encoder.weight"] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json names shard .*not a file inside"):
        io.open_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("entry, problem", [
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}, "span 16 bytes but shape"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 48]}, "outside the 24-byte data section"),
    ({"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}, "non-negative integers"),
    ({"dtype": "Q4", "shape": [6], "data_offsets": [0, 24]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [6], "data_offsets": [8]}, "pair of integers"),
])
def test_header_offsets_that_disagree_with_shape_and_dtype_are_named(tmp_path, entry, problem):
    path = tmp_path / "bad.safetensors"
    _write_raw_safetensors(path, {"w": entry}, bytes(24))
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: tensor 'w' .*{problem}"):
        io.open_checkpoint(path)


def test_old_format_torch_file_names_the_file(tmp_path, state):
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pt is an old-format \(non-zip\) torch checkpoint"):
        io.open_checkpoint(path)


def test_reads_are_fresh_writable_tensors(tmp_path, state):
    io.save_state_dict(state, tmp_path / "model.safetensors")
    reader = io.open_checkpoint(tmp_path / "model.safetensors")
    assert reader.fresh_reads
    first = reader["encoder.weight"]
    first.add_(1)  # the caller owns it: the file and later reads are unaffected
    assert torch.equal(reader["encoder.weight"], state["encoder.weight"])
    io.save_state_dict(state, tmp_path / "model.pt")
    assert not io.open_checkpoint(tmp_path / "model.pt").fresh_reads  # memory-mapped, shared between reads


def test_written_files_are_standard_safetensors(tmp_path, state):
    """Files from distac's writer load with the safetensors library itself, empty and 0-d tensors included."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    full = {**state, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    io.save_state_dict(full, tmp_path / "model.safetensors", metadata={"b": "2", "a": "1"})
    assert_same(load_file(tmp_path / "model.safetensors"), full)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "a": "1", "b": "2"}
    assert_same(io.load_state_dict(tmp_path / "model.safetensors"), full)


_WRITE_TWICE = """
import sys, torch
from distac import io
state = {name: torch.full((3,), float(i)) for i, name in enumerate(["z", "a", "m.weight", "b.bias"])}
io.save_state_dict(state, sys.argv[1] + "/single.safetensors", metadata={"zeta": "1", "alpha": "2", "mid": "3"})
io.save_state_dict(state, sys.argv[1] + "/sharded", max_shard_bytes=16, metadata={"zeta": "1", "alpha": "2"})
"""


def test_identical_runs_write_byte_identical_files(tmp_path):
    """Metadata keys are sorted, so the bytes do not depend on the process (hash seeds, map order)."""
    import hashlib
    import subprocess
    import sys

    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"run-{seed}"
        out.mkdir()
        subprocess.run([sys.executable, "-c", _WRITE_TWICE, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        files = sorted(p for p in out.rglob("*") if p.is_file())
        digests.append({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert len(digests[0]) == 1 + 4 + 1  # one file, four shards and their index
    assert digests[0] == digests[1]
