"""The streaming merge: real checkpoint files in, sharded safetensors out, equal to the in-memory merge;
the CLI end to end; the errors bad inputs get; atomic output; S3."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from distac import io
from distac.cli import main
from distac.errors import CheckpointError, ConfigError, MismatchError, NonFiniteError
from distac.merging import METHODS, merge
from distac.merging.base import input_bytes, iter_task_tensors, load_tensors
from distac.merging.streaming import load_merged, materialize, merge_checkpoints
from distac.vectors import LazyTaskVector, TaskVector
from helpers import CountingReader

SETTINGS = {"wudi": {"steps": 5}, "ties": {"k": 0.3}, "consensus": {"min_agree": 2}, "iso_cts": {}}
NUM_TASKS = 3


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in state.items()}


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"block.0.weight": torch.randn(12, 8, generator=generator),
            "block.0.bias": torch.randn(12, generator=generator),
            "conv.weight": torch.randn(4, 3, 2, 2, generator=generator),
            "block.1.weight": torch.randn(8, 12, generator=generator),
            "scale": torch.tensor(1.5),
            "position_ids": torch.arange(6)}


@pytest.fixture
def checkpoints(tmp_path):
    """A pretrained .pt and three fine-tuned checkpoints: sharded safetensors, one safetensors file, a .pt."""
    pre = small_state()
    io.save_state_dict(pre, tmp_path / "pre.pt")
    io.save_state_dict(perturbed(pre, 1), tmp_path / "ft0", max_shard_bytes=200)  # several shards + index
    io.save_state_dict(perturbed(pre, 2), tmp_path / "ft1.safetensors")
    io.save_state_dict(perturbed(pre, 3), tmp_path / "ft2.pt")
    assert (tmp_path / "ft0" / io.INDEX_FILE_NAME).exists()
    return str(tmp_path / "pre.pt"), [str(tmp_path / n) for n in ("ft0", "ft1.safetensors", "ft2.pt")]


def in_memory(name, pretrained, finetuned, include=None, **hyperparams):
    vectors = [TaskVector.from_checkpoints(pretrained, uri, include=include) for uri in finetuned]
    return merge(name, vectors, device="cpu", **hyperparams)


def assert_same_tensors(actual, expected, atol=1e-6):
    assert list(actual) == list(expected) or sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        if expected[key].is_floating_point():
            assert torch.allclose(actual[key], expected[key], atol=atol, rtol=0), key
        else:
            assert torch.equal(actual[key], expected[key]), key


def assert_streaming_matches(name, pretrained, finetuned, out, include=None, **hyperparams):
    record = merge_checkpoints(METHODS[name].create(**hyperparams), pretrained, finetuned, out, include=include,
                               device="cpu", max_shard_bytes=300, progress=False)
    expected = in_memory(name, pretrained, finetuned, include=include, **hyperparams)
    streamed = load_merged(out)
    assert_same_tensors(streamed.vector, expected.vector)
    pre_state = io.load_state_dict(pretrained)
    for task in range(len(finetuned)):
        model = str(out) + f"-task{task}.safetensors"
        materialize(out, pretrained, task, model)
        assert_same_tensors(io.load_state_dict(model), expected.for_task(task).apply_to(pre_state))
    if METHODS[name].per_task:
        assert streamed.scales == pytest.approx(expected.scales, abs=1e-12)
        for mask, expected_mask in zip(streamed.masks, expected.masks):
            assert_same_tensors(mask, expected_mask)
        assert record["outputs"]["model"] is None and not os.path.exists(os.path.join(out, "model"))
    else:
        assert_same_tensors(io.load_state_dict(os.path.join(out, "model")), expected.vector.apply_to(pre_state))
    return record


@pytest.mark.parametrize("name", sorted(METHODS))
def test_streaming_equals_in_memory(name, checkpoints, tmp_path):
    pretrained, finetuned = checkpoints
    record = assert_streaming_matches(name, pretrained, finetuned, str(tmp_path / "out"), **SETTINGS.get(name, {}))
    assert record["method"] == name and record["num_tasks"] == NUM_TASKS and record["path"] == "streaming"
    assert record["inputs"]["finetuned"] == finetuned and record["device"] == "cpu"
    assert (tmp_path / "out" / "vector" / io.INDEX_FILE_NAME).exists()  # 300-byte shards: output is sharded


@pytest.mark.parametrize("name", ["ties", "tsv", "emr"])
def test_streaming_a_hugging_face_bert_checkpoint(name, tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=20)
    torch.manual_seed(0)
    model = BertModel(config)
    model.save_pretrained(tmp_path / "pre", safe_serialization=True)
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    finetuned = []
    for task in range(2):
        model.load_state_dict(perturbed(pre, 10 + task))
        model.save_pretrained(tmp_path / f"ft{task}", safe_serialization=True)
        finetuned.append(str(tmp_path / f"ft{task}"))
    assert_streaming_matches(name, str(tmp_path / "pre"), finetuned, str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["iso_cts", "consensus"])
def test_streaming_the_image_tower_of_an_open_clip_model(name, tmp_path):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                          text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1))
    pre = clip.state_dict()
    torch.save(pre, tmp_path / "pre.pt")
    finetuned = []
    for task in range(3):
        torch.save(perturbed(pre, 20 + task, scale=0.01), tmp_path / f"ft{task}.pt")
        finetuned.append(str(tmp_path / f"ft{task}.pt"))
    out = str(tmp_path / "out")
    assert_streaming_matches(name, str(tmp_path / "pre.pt"), finetuned, out, include=[r"^visual\."])
    merged = load_merged(out)
    assert merged.vector and all(key.startswith("visual.") for key in merged.vector)
    model = io.load_state_dict(os.path.join(out, "model"))
    assert torch.equal(model["text_projection"], pre["text_projection"])  # not merged: passed through


def test_cli_merge_and_materialize_end_to_end(checkpoints, tmp_path, capsys):
    pretrained, finetuned = checkpoints
    out = str(tmp_path / "merged")
    code = main(["merge", "--method", "ties", "--pretrained", pretrained, "--finetuned", *finetuned, "--out", out,
                 "--alpha", "0.7", "--set", "k=0.3", "--exclude", "^conv", "--device", "cpu", "--shard-size", "1KB"])
    assert code == 0 and "merged 3 tasks over 4 tensors with ties (alpha=0.7, k=0.3)" in capsys.readouterr().out
    expected = merge("ties", [TaskVector.from_checkpoints(pretrained, f, exclude=["^conv"]) for f in finetuned],
                     alpha=0.7, k=0.3)
    assert_same_tensors(load_merged(out).vector, expected.vector)
    assert main(["materialize", "--merged", out, "--pretrained", pretrained, "--task", "2",
                 "--out", str(tmp_path / "served"), "--no-progress"]) == 0
    assert_same_tensors(io.load_state_dict(tmp_path / "served"),
                        expected.vector.apply_to(io.load_state_dict(pretrained)))


def test_cli_set_parses_typed_values(checkpoints, tmp_path):
    pretrained, finetuned = checkpoints
    out = str(tmp_path / "merged")
    assert main(["merge", "--method", "wudi", "--pretrained", pretrained, "--finetuned", *finetuned, "--out", out,
                 "--set", "steps=2", "--set", "lr=1e-4", "--set", r"exclude_2d=^block\.1,^nothing",
                 "--no-progress"]) == 0
    assert load_merged(out).info["hyperparameters"] == {"steps": 2, "lr": 1e-4,
                                                         "exclude_2d": [r"^block\.1", "^nothing"]}


@pytest.mark.parametrize("argv, message", [
    (["--method", "tie"], "unknown merge method 'tie'; available: consensus, emr, iso_c, iso_cts"),
    (["--method", "ties", "--set", "kk=1"], "ties has no hyperparameter 'kk'; it accepts: alpha, k"),
    (["--method", "ties", "--set", "k=high"], "--set k: expected a number, got 'high'"),
    (["--method", "ties", "--set", "k=2"], "ties: k must be > 0.0 and <= 1.0, got 2"),
    (["--method", "emr", "--alpha", "2"], "emr has no hyperparameter alpha"),
])
def test_cli_bad_method_or_hyperparameter(checkpoints, tmp_path, capsys, argv, message):
    pretrained, finetuned = checkpoints
    code = main(["merge", *argv, "--pretrained", pretrained, "--finetuned", *finetuned, "--out", str(tmp_path / "o")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_runs_as_a_subprocess(checkpoints, tmp_path):
    pretrained, finetuned = checkpoints
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "distac", "merge", "--method", "iso_c", "--pretrained", pretrained,
                             "--finetuned", *finetuned, "--out", str(out), "--alpha", "1.5"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "merge (iso_c)" in result.stderr  # the tqdm progress bar over tensors
    assert_same_tensors(load_merged(str(out)).vector, in_memory("iso_c", pretrained, finetuned, alpha=1.5).vector)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def safetensors_inputs(tmp_path):
    pre = small_state()
    io.save_state_dict(pre, tmp_path / "pre.safetensors")
    return pre, str(tmp_path / "pre.safetensors")


def run_merge(tmp_path, pretrained, finetuned, method="task_arithmetic"):
    return merge_checkpoints(method, pretrained, finetuned, str(tmp_path / "out"), device="cpu", progress=False)


def test_mismatched_keys_name_the_tensor(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    io.save_state_dict({k: v for k, v in perturbed(pre, 1).items() if k != "conv.weight"}, tmp_path / "ft.safetensors")
    with pytest.raises(MismatchError, match="missing from the .*ft.safetensors model: conv.weight"):
        run_merge(tmp_path, pre_uri, [str(tmp_path / "ft.safetensors")])


def test_mismatched_shapes_name_the_tensor(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    io.save_state_dict({**perturbed(pre, 1), "block.0.bias": torch.zeros(13)}, tmp_path / "ft.safetensors")
    with pytest.raises(MismatchError, match=r"'block.0.bias': shape \(13,\)"):
        run_merge(tmp_path, pre_uri, [str(tmp_path / "ft.safetensors")])


def test_mismatched_dtypes_name_the_tensor(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    ft = perturbed(pre, 1)
    io.save_state_dict({**ft, "block.1.weight": ft["block.1.weight"].half()}, tmp_path / "ft.safetensors")
    with pytest.raises(MismatchError, match="'block.1.weight': dtype torch.float16"):
        run_merge(tmp_path, pre_uri, [str(tmp_path / "ft.safetensors")])


def test_nan_in_a_finetuned_model_names_the_tensor_and_leaves_nothing(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    last_key = list(TaskVector.from_checkpoints(pre_uri, pre_uri))[-1]  # the merge reaches it last
    broken = perturbed(pre, 1)
    broken[last_key] = broken[last_key].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view_as(pre[last_key])
    io.save_state_dict(perturbed(pre, 2), tmp_path / "ok.safetensors")
    io.save_state_dict(broken, tmp_path / "bad.safetensors")
    for method in ("task_arithmetic", "emr", "ties"):
        with pytest.raises(NonFiniteError, match=f"tensor '{last_key}' in .*bad.safetensors has 1 NaN"):
            run_merge(tmp_path, pre_uri, [str(tmp_path / "ok.safetensors"), str(tmp_path / "bad.safetensors")], method)
        assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors", "ok.safetensors", "pre.safetensors"]  # no staging left


def test_a_failed_merge_keeps_the_previous_output(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    io.save_state_dict(perturbed(pre, 1), tmp_path / "ft.safetensors")
    run_merge(tmp_path, pre_uri, [str(tmp_path / "ft.safetensors")])
    before = load_merged(str(tmp_path / "out")).vector
    broken = {**perturbed(pre, 2), "scale": torch.tensor(float("inf"))}
    io.save_state_dict(broken, tmp_path / "bad.safetensors")
    with pytest.raises(NonFiniteError, match="'scale'"):
        run_merge(tmp_path, pre_uri, [str(tmp_path / "bad.safetensors")])
    assert_same_tensors(load_merged(str(tmp_path / "out")).vector, before)


def test_truncated_safetensors_is_a_checkpoint_error(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    io.save_state_dict(perturbed(pre, 1), tmp_path / "ft.safetensors")
    data = (tmp_path / "ft.safetensors").read_bytes()
    (tmp_path / "ft.safetensors").write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="ft.safetensors"):
        run_merge(tmp_path, pre_uri, [str(tmp_path / "ft.safetensors")])


def test_materialize_rejects_a_task_index_out_of_range(checkpoints, tmp_path):
    pretrained, finetuned = checkpoints
    merge_checkpoints("task_arithmetic", pretrained, finetuned, str(tmp_path / "out"), progress=False)
    with pytest.raises(ConfigError, match="task index 3 is out of range: .* merged 3 tasks"):
        materialize(str(tmp_path / "out"), pretrained, 3, str(tmp_path / "model"))


def test_an_absent_cuda_device_is_a_clear_error(checkpoints, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    pretrained, finetuned = checkpoints
    with pytest.raises(ConfigError, match="no CUDA device"):
        merge_checkpoints("tsv", pretrained, finetuned, str(tmp_path / "out"), device="cuda", progress=False)


# ----------------------------------------------------------------------------------------------------- S3


def test_streaming_merge_from_and_to_s3(s3_bucket, tmp_path):
    pre = small_state()
    io.save_state_dict(pre, f"{s3_bucket}/pre.safetensors")
    finetuned = [f"{s3_bucket}/ft0", f"{s3_bucket}/ft1.safetensors"]
    io.save_state_dict(perturbed(pre, 1), finetuned[0], max_shard_bytes=200)
    io.save_state_dict(perturbed(pre, 2), finetuned[1])
    out = f"{s3_bucket}/merged/emr"
    merge_checkpoints("emr", f"{s3_bucket}/pre.safetensors", finetuned, out, max_shard_bytes=300, progress=False)
    streamed = load_merged(out)
    local = [str(tmp_path / "ft0"), str(tmp_path / "ft1.safetensors")]
    io.save_state_dict(perturbed(pre, 1), local[0])
    io.save_state_dict(perturbed(pre, 2), local[1])
    io.save_state_dict(pre, tmp_path / "pre.safetensors")
    expected = in_memory("emr", str(tmp_path / "pre.safetensors"), local)
    assert_same_tensors(streamed.vector, expected.vector)
    assert streamed.scales == pytest.approx(expected.scales)
    materialize(out, f"{s3_bucket}/pre.safetensors", 1, f"{s3_bucket}/served-1")
    assert_same_tensors(io.load_state_dict(f"{s3_bucket}/served-1"), expected.for_task(1).apply_to(pre))


@pytest.mark.parametrize("name, passes", [("task_arithmetic", 1), ("emr", 1), ("ties", 3)])
def test_streaming_reads_each_pretrained_tensor_once_per_pass(name, passes, safetensors_inputs, tmp_path):
    """θ_pre is cached per key across the T tasks; TIES needs two extra passes for its exact global threshold;
    the served model (not written for EMR) reads θ_pre once more."""
    pre, pre_uri = safetensors_inputs
    finetuned = []
    for task in range(3):
        io.save_state_dict(perturbed(pre, task), tmp_path / f"ft{task}.safetensors")
        finetuned.append(str(tmp_path / f"ft{task}.safetensors"))
    counting = CountingReader(io.open_checkpoint(pre_uri))
    merge_checkpoints(name, counting, finetuned, str(tmp_path / "out"), device="cpu", progress=False)
    order = list(counting)  # the file's order
    floating = [key for key in order if pre[key].is_floating_point()]
    model_pass = [] if METHODS[name].per_task else order
    assert counting.reads == floating * passes + model_pass


def reads_after_settling(counting: CountingReader, expected: int) -> list[str]:
    """The keys read so far, once ``expected`` reads happened (or 10 s passed) and 0.1 s more brought none."""
    deadline = time.monotonic() + 10
    while len(counting.reads) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    return list(counting.reads)


def test_the_next_key_is_read_while_the_current_one_is_merged(safetensors_inputs, tmp_path):
    """``iter_task_tensors`` reads exactly one key ahead (two keys in memory, never three), yields what
    ``load_tensors`` gives, and empties each key's list once the caller moves on."""
    pre, pre_uri = safetensors_inputs
    io.save_state_dict(perturbed(pre, 1), tmp_path / "ft.safetensors")
    counting = CountingReader(io.open_checkpoint(pre_uri))
    vectors = [LazyTaskVector(counting, io.open_checkpoint(str(tmp_path / "ft.safetensors")))]
    keys = list(vectors[0])
    loaded = iter_task_tensors(keys, vectors, torch.device("cpu"))
    key, first, dtype = next(loaded)
    assert key == keys[0] and dtype == torch.float32
    assert torch.equal(first[0], load_tensors(keys[0], vectors, torch.device("cpu"))[0][0])
    # keys[0] twice (the iterator's read, then ours) and the read-ahead of keys[1]; keys[2] waits its turn
    assert reads_after_settling(counting, 3) == [keys[0], keys[0], keys[1]]
    rest = list(loaded)
    assert first == [] and [key for key, _, _ in rest] == keys[1:]


def test_lazy_inputs_load_into_two_alternating_buffers(tmp_path):
    """float32 checkpoints are read straight into one of two buffers that alternate from key to key; other
    dtypes are differenced in their own dtype and converted; either way the values are those of ``v[key]``."""
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        pre = {k: v.to(dtype) if v.is_floating_point() else v for k, v in small_state().items()}
        io.save_state_dict(pre, tmp_path / f"pre-{dtype}.safetensors")
        vectors = []
        for task in range(2):
            io.save_state_dict(perturbed(pre, task + 1), tmp_path / f"ft{task}-{dtype}.safetensors")
            vectors.append(LazyTaskVector.from_checkpoints(tmp_path / f"pre-{dtype}.safetensors",
                                                           tmp_path / f"ft{task}-{dtype}.safetensors"))
        keys = list(vectors[0])
        storages = []
        for key, tensors, original in iter_task_tensors(keys, vectors, cpu):
            assert original == dtype
            for vector, tensor in zip(vectors, tensors):
                assert tensor.dtype == torch.float32 and torch.equal(tensor, vector[key].float())
            storages.append({t.untyped_storage().data_ptr() for t in tensors})
        assert all(len(s) == 1 for s in storages)  # every task's tensor of a key lies in one buffer ...
        assert storages[0] != storages[1] and storages[0::2] == [storages[0]] * len(storages[0::2])  # ... of two
    reader = io.open_checkpoint(tmp_path / "pre-torch.float32.safetensors")
    with pytest.raises(ValueError, match="cannot read tensor 'block.0.bias'"):
        reader.read_into("block.0.bias", torch.empty(13))


def test_a_result_that_views_its_inputs_is_copied_before_they_are_reused(safetensors_inputs, tmp_path):
    """The engine's input buffers are refilled two keys later: a method may return a view of its inputs."""
    from distac.merging import collect
    from distac.merging.base import MergeMethod

    class FirstTask(MergeMethod):
        name = "first_task"

        def merge_tensor(self, key, tensors):
            return tensors[0].view(-1).view(tensors[0].shape)

    pre, pre_uri = safetensors_inputs
    finetuned = []
    for task in range(2):
        io.save_state_dict(perturbed(pre, task + 1), tmp_path / f"ft{task}.safetensors")
        finetuned.append(LazyTaskVector.from_checkpoints(pre_uri, tmp_path / f"ft{task}.safetensors"))
    merged = collect(FirstTask(), finetuned, device="cpu")
    assert all(torch.equal(merged.vector[key], finetuned[0][key]) for key in finetuned[0])


def test_a_read_error_surfaces_at_its_key_and_closing_early_stops_reading(safetensors_inputs, tmp_path):
    pre, pre_uri = safetensors_inputs
    io.save_state_dict({**perturbed(pre, 1), "block.1.weight": torch.zeros(8, 12).half()}, tmp_path / "bad.safetensors")
    vectors = [TaskVector.from_checkpoints(pre_uri, pre_uri),
               LazyTaskVector.from_checkpoints(pre_uri, tmp_path / "bad.safetensors")]
    keys = list(vectors[0])
    seen = []
    with pytest.raises(MismatchError, match="'block.1.weight': dtype torch.float16"):
        for key, _, _ in iter_task_tensors(keys, vectors, torch.device("cpu")):
            seen.append(key)
    assert seen == keys[:keys.index("block.1.weight")]
    counting = CountingReader(io.open_checkpoint(pre_uri))
    loaded = iter_task_tensors(keys, [LazyTaskVector(counting, io.open_checkpoint(pre_uri))], torch.device("cpu"))
    next(loaded)
    loaded.close()  # cancels the read ahead or waits for it; starts no other
    time.sleep(0.1)
    assert counting.reads in (keys[:1], keys[:2])


def test_reading_ahead_stays_within_its_budget(safetensors_inputs, tmp_path):
    """A key whose T float32 inputs exceed the budget is read only when its turn comes; 0 turns reading ahead
    off; the CLI's --read-ahead 0 merges to the same bits."""
    pre, pre_uri = safetensors_inputs
    io.save_state_dict(perturbed(pre, 1), tmp_path / "ft.safetensors")
    io.save_state_dict(perturbed(pre, 2, scale=0.2), tmp_path / "ft2.safetensors")
    finetuned = [str(tmp_path / "ft.safetensors"), str(tmp_path / "ft2.safetensors")]
    counting = CountingReader(io.open_checkpoint(pre_uri))
    vectors = [LazyTaskVector(counting, io.open_checkpoint(uri)) for uri in finetuned]
    keys = list(vectors[0])
    assert [input_bytes(key, vectors) for key in keys] == [2 * 4 * pre[key].numel() for key in keys]
    budget = 2 * 4 * pre["block.0.bias"].numel()  # block.0.bias fits, the weights do not
    for read_ahead_bytes in (0, budget):
        counting.reads.clear()
        for index, (key, _, _) in enumerate(iter_task_tensors(keys, vectors, torch.device("cpu"), read_ahead_bytes)):
            ahead = index + 1 < len(keys) and read_ahead_bytes and input_bytes(keys[index + 1], vectors) <= budget
            expected = [k for k in keys[:index + 1 + bool(ahead)] for _ in vectors]
            assert reads_after_settling(counting, len(expected)) == expected
    assert main(["merge", "--method", "ties", "--pretrained", pre_uri, "--finetuned", *finetuned,
                 "--out", str(tmp_path / "off"), "--read-ahead", "0", "--no-progress"]) == 0
    assert main(["merge", "--method", "ties", "--pretrained", pre_uri, "--finetuned", *finetuned,
                 "--out", str(tmp_path / "on"), "--read-ahead", "1KB", "--no-progress"]) == 0
    off, on = (io.load_state_dict(str(tmp_path / name / "vector")) for name in ("off", "on"))
    assert all(torch.equal(off[key], on[key]) for key in on) and list(off) == list(on)
