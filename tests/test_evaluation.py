"""Accuracy, normalized accuracy, merged-model evaluation, the α search and the result tables."""

from __future__ import annotations

import pytest
import torch

from distac.errors import ConfigError
from distac.evaluation import (MergedEvaluation, TaskEvaluation, accuracy, evaluate_merged,
                               evaluate_task, has_alpha, matthews_correlation, normalized_accuracy, per_task_table_markdown,
                               predict_logits, results_table_markdown, at_alpha, search_alpha)
from distac.merging import METHODS, merge
from distac.vectors import TaskVector
from tiny_mlp import MLPAdapter, collate, finetune, make_task, one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

GRID = (0.2, 0.5, 1.0)


@pytest.fixture(scope="module")
def sources():
    adapter = MLPAdapter()
    pretrained = adapter.pretrained_backbone_state()
    tasks = [make_task("a", seed=1), make_task("b", seed=2, num_classes=2)]
    models = [finetune(adapter, task, steps=80) for task in tasks]
    vectors = [TaskVector.from_state_dicts(pretrained, m.backbone_state()) for m in models]
    heads = [m.head_state() for m in models]
    return adapter, pretrained, tasks, models, vectors, heads


def test_accuracy_and_normalized_accuracy_exact():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    assert normalized_accuracy(0.6, 0.8) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="fine-tuned accuracy"):
        normalized_accuracy(0.5, 0.0)
    with pytest.raises(ConfigError, match="labels"):
        accuracy(logits, torch.tensor([0, 1]))


def test_matthews_correlation_exact_binary_multiclass_and_degenerate():
    def one_hot(predictions: list[int], classes: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(predictions), classes).float()

    # binary: tp 2, tn 1, fp 1, fn 1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews_correlation(one_hot([1, 1, 0, 1, 0], 2), torch.tensor([1, 1, 0, 0, 1])) == pytest.approx(1 / 6)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    assert matthews_correlation(one_hot(labels.tolist(), 3), labels) == pytest.approx(1.0)
    assert matthews_correlation(one_hot([1, 1, 1, 1], 2), torch.tensor([0, 1, 0, 1])) == 0.0  # one class predicted
    # multiclass R_K, by hand: n 6, correct 3, p = (2, 2, 2), t = (2, 2, 2): (3*6 - 12) / (36 - 12) = 0.25
    assert matthews_correlation(one_hot([0, 1, 2, 1, 2, 0], 3), torch.tensor([0, 1, 2, 0, 1, 2])) == pytest.approx(0.25)


def test_evaluate_task_matches_manual_prediction(sources):
    adapter, pretrained, tasks, models, vectors, heads = sources
    result = evaluate_task(models[0], tasks[0].test, collate, task="a", batch_size=7, finetuned_accuracy=0.5)
    logits = models[0](collate(tasks[0].test)).detach()
    expected = (logits.argmax(1) == torch.tensor([p.label for p in tasks[0].test])).float().mean().item()
    assert result.accuracy == pytest.approx(expected)
    assert result.normalized_accuracy == pytest.approx(expected / 0.5)
    assert result.num_examples == len(tasks[0].test)
    torch.testing.assert_close(predict_logits(models[0], tasks[0].test, collate, batch_size=3), logits)


def test_evaluate_merged_serves_each_task_with_its_head(sources):
    adapter, pretrained, tasks, models, vectors, heads = sources
    merged = merge("task_arithmetic", vectors, alpha=0.5)
    finetuned = {t.name: evaluate_task(m, t.test, collate).accuracy for t, m in zip(tasks, models)}
    result = evaluate_merged(adapter, pretrained, merged, heads, tasks, finetuned_accuracy=finetuned, device="cpu")
    for task, head, row in zip(tasks, heads, result.tasks):
        model = adapter.build(task.num_classes)
        model.load_head(head)
        model.load_backbone((0.5 * (vectors[0] + vectors[1])).apply_to(pretrained))
        assert row.accuracy == pytest.approx(evaluate_task(model, task.test, collate).accuracy)
        assert row.normalized_accuracy == pytest.approx(row.accuracy / finetuned[task.name])
    assert result.mean_accuracy == pytest.approx(sum(r.accuracy for r in result.tasks) / 2)
    with pytest.raises(ConfigError, match="align"):
        evaluate_merged(adapter, pretrained, merged, heads[:1], tasks, device="cpu")


@pytest.mark.parametrize("method", [name for name in METHODS if has_alpha(name)])
def test_scaling_the_alpha_one_merge_equals_re_merging(sources, method):
    vectors = sources[4]
    once = merge(method, vectors, alpha=1.0, device="cpu")
    for alpha in GRID:
        remerged = merge(method, vectors, alpha=alpha, device="cpu")
        scaled = at_alpha(once, alpha)
        assert scaled.alpha == remerged.alpha == alpha
        for key in remerged.vector:
            torch.testing.assert_close(scaled.vector[key], remerged.vector[key], rtol=1e-5, atol=1e-6)


def test_search_alpha_scores_equal_evaluating_re_merged_models(sources):
    adapter, pretrained, tasks, models, vectors, heads = sources
    search = search_alpha("task_arithmetic", vectors, adapter, pretrained, heads, tasks, grid=GRID,
                          device="cpu")
    for alpha in GRID:
        remerged = merge("task_arithmetic", vectors, alpha=alpha)
        evaluation = evaluate_merged(adapter, pretrained, remerged, heads, tasks, split="validation", device="cpu")
        assert search.scores[alpha] == pytest.approx(evaluation.mean_accuracy)
    assert search.scores[search.alpha] == max(search.scores.values())
    assert search.evaluation.mean_accuracy == pytest.approx(search.scores[search.alpha])
    torch.testing.assert_close(search.merged.vector["0.weight"],
                               search.alpha * (vectors[0] + vectors[1])["0.weight"])
    with pytest.raises(ConfigError, match="alpha"):
        search_alpha("task_arithmetic", vectors, adapter, pretrained, heads, tasks, hyperparams={"alpha": 1.0})


def test_a_best_alpha_at_the_grid_edge_is_followed_beyond_it(sources):
    adapter, pretrained, tasks, models, vectors, heads = sources
    grid = [0.5, 1.0]  # two values: the better one is always at an edge
    search = search_alpha("task_arithmetic", vectors, adapter, pretrained, heads, tasks, grid=grid, device="cpu")
    on_grid = max(grid, key=lambda a: (search.scores[a], -grid.index(a)))
    first = 1.5 if on_grid == 1.0 else round(0.5 / 1.5, 6)
    assert search.extended[0] == first and list(search.scores) == grid + search.extended
    for previous, alpha in zip([on_grid, *search.extended], search.extended):  # each a further step out
        assert alpha == pytest.approx(previous * 1.5 if on_grid == 1.0 else previous / 1.5, rel=1e-5)
        remerged = merge("task_arithmetic", vectors, alpha=alpha)
        evaluation = evaluate_merged(adapter, pretrained, remerged, heads, tasks, split="validation", device="cpu")
        assert search.scores[alpha] == pytest.approx(evaluation.mean_accuracy)
    improving = all(search.scores[b] > search.scores[a]
                    for a, b in zip([on_grid, *search.extended], search.extended))
    assert len(search.extended) == 3 or not improving  # stops at the first α that is no better
    assert search.scores[search.alpha] == max(search.scores.values())
    assert search.to_dict()["extended"] == search.extended
    inside = search_alpha("task_arithmetic", vectors, adapter, pretrained, heads, tasks, grid=grid, device="cpu",
                          extend=0)
    assert inside.extended == [] and inside.alpha == on_grid


def test_methods_without_alpha_are_evaluated_once(sources):
    adapter, pretrained, tasks, models, vectors, heads = sources
    search = search_alpha("emr", vectors, adapter, pretrained, heads, tasks, device="cpu")
    assert search.alpha is None and search.scores == {}
    direct = evaluate_merged(adapter, pretrained, merge("emr", vectors), heads, tasks, split="validation",
                             device="cpu")
    assert search.evaluation.mean_accuracy == pytest.approx(direct.mean_accuracy)
    assert search.to_dict()["alpha"] is None


def test_a_searched_merge_is_evaluated_at_its_alpha_never_scaled_twice(sources):
    adapter, pretrained, tasks, models, vectors, heads = sources
    search = search_alpha("task_arithmetic", vectors, adapter, pretrained, heads, tasks, grid=GRID, device="cpu")
    again = evaluate_merged(adapter, pretrained, search.merged, heads, tasks, split="validation", device="cpu")
    assert again.alpha == search.alpha == search.merged.alpha
    assert again.mean_accuracy == search.scores[search.alpha]
    rescaled = at_alpha(search.merged, 1.0)  # back to α = 1: the vector of the α = 1 merge
    torch.testing.assert_close(rescaled.vector["0.weight"], merge("task_arithmetic", vectors).vector["0.weight"])
    with pytest.raises(ConfigError, match="no α"):
        at_alpha(merge("emr", vectors), 0.5)
    with pytest.raises(TypeError):
        evaluate_merged(adapter, pretrained, search.merged, heads, tasks, alpha=0.5)  # no second α to apply


def test_has_alpha_is_each_methods_declared_capability():
    for name, cls in METHODS.items():
        assert cls.has_alpha == ("alpha" in cls.hyperparameters()), name
        assert has_alpha(name) is cls.has_alpha


def _evaluation(method: str, accs: tuple[float, float], alpha: float | None = None) -> MergedEvaluation:
    rows = [TaskEvaluation(name, acc, 10, 0.9, 0.1, 0.05, acc / 0.8) for name, acc in zip(("a", "b"), accs)]
    return MergedEvaluation(method, alpha, "test", rows)


def test_tables_in_the_papers_layout():
    ta, ties = _evaluation("task_arithmetic", (0.6, 0.8), 0.5), _evaluation("ties", (0.4, 0.4))
    assert per_task_table_markdown([ta, ties], finetuned_accuracy={"a": 0.8, "b": 0.8}) == "\n".join([
        "| Method | a | b | Avg. abs. | Avg. norm. |",
        "|---|---|---|---|---|",
        "| Individual | 80.0 | 80.0 | 80.0 | 100.0 |",
        "| task_arithmetic (α=0.5) | 60.0 (75.0) | 80.0 (100.0) | 70.0 | 87.5 |",
        "| ties | 40.0 (50.0) | 40.0 (50.0) | 40.0 | 50.0 |"])
    table = results_table_markdown({"original": {"task_arithmetic": ta, "ties": ties},
                                    "norm mismatch": {"task_arithmetic": ties}})
    assert table.splitlines() == [
        "| Method | original abs. | original norm. | norm mismatch abs. | norm mismatch norm. |",
        "|---|---|---|---|---|",
        "| task_arithmetic | 70.0 | 87.5 | 40.0 | 50.0 |",
        "| ties | 40.0 | 50.0 | – | – |"]


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """θ_pre and two source models (RTE, MRPC) of a tiny random BERT, stored as `distac finetune` does."""
    pytest.importorskip("transformers")
    from distac.data import load_task
    from distac.data.glue import find_glue_root
    from distac.models import build_adapter
    from distac.models.store import save_pretrained, save_task_model
    from distac.models.text import create_random_encoder
    from distac.training import FinetuneRecipe, finetune as finetune_model

    glue = find_glue_root()
    if glue is None:
        pytest.skip("GLUE data not found")
    root = tmp_path_factory.mktemp("cli")
    adapter = build_adapter({"kind": "hf_text", "name_or_path": create_random_encoder(root / "encoder"),
                             "max_length": 24})
    save_pretrained(adapter, root / "pre")
    sources = []
    for i, name in enumerate(("rte", "mrpc")):
        data = load_task(name, root=glue, max_train=48, max_eval=24)
        recipe = FinetuneRecipe(lr=5e-3 * (1 + 4 * i), steps=6, batch_size=16)  # norms differ by design
        model = finetune_model(adapter, data, recipe, progress=False).model
        save_task_model(root / name, model, adapter, data.name, data.num_classes, data.class_names)
        sources.append(str(root / name))
    return root, str(glue), str(root / "pre"), sources


def _cli(*argv: str) -> int:
    from distac.cli import main

    return main([str(a) for a in argv])


def test_cli_extract_diagnose_condition_evaluate(text_models, capsys):
    import json

    from distac.io import read_json

    root, glue, pre, (rte, mrpc) = text_models
    assert _cli("extract", "--pretrained", pre, "--finetuned", rte, "--out", root / "tv-rte") == 0
    from distac.models.store import backbone_uri
    expected = TaskVector.from_checkpoints(backbone_uri(pre), backbone_uri(rte))
    extracted = TaskVector.load(root / "tv-rte")
    assert extracted.norm() == pytest.approx(expected.norm())

    assert _cli("diagnose", "--pretrained", pre, "--finetuned", rte, mrpc, "--json", root / "diag.json",
                "--glue-dir", glue, "--num-unlabeled", 16, "--max-eval", 16) == 0
    diagnosis = read_json(root / "diag.json")
    assert [t["name"] for t in diagnosis["tasks"]] == ["rte", "mrpc"]
    assert all(t["ece"] is not None and t["mean_max_prob"] is not None for t in diagnosis["tasks"])
    assert "Pairwise cosines" in capsys.readouterr().out

    out = root / "conditioned"
    assert _cli("condition", "--pretrained", pre, "--finetuned", mrpc, "--out", out, "--target-norm",
                0.5 * TaskVector.from_checkpoints(backbone_uri(pre), backbone_uri(mrpc)).norm(),
                "--steps", 4, "--batch-size", 16, "--num-unlabeled", 32, "--lr", 1e-3, "--log-every", 2,
                "--glue-dir", glue, "--no-progress") == 0
    history = read_json(out / "history.json")
    assert history["kappa"] == pytest.approx(0.5) and [h["step"] for h in history["history"]] == [2, 4]
    conditioned = TaskVector.load(out / "task_vector")
    assert conditioned.norm() == pytest.approx(history["final_norm"], rel=1e-5)
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    served = TaskVector.from_checkpoints(backbone_uri(pre), backbone_uri(out / "model"))
    assert served.norm() == pytest.approx(conditioned.norm(), rel=1e-4)

    assert _cli("evaluate", "--finetuned", rte, out / "model", "--pretrained", pre, "--method",
                "task_arithmetic", "--search-alpha", "--grid", 0.5, 1.0, "--glue-dir", glue, "--max-eval", 16,
                "--device", "cpu", "--json", root / "eval.json") == 0
    report = json.loads((root / "eval.json").read_text())
    search = report["alpha_search"]
    assert {"0.5", "1.0"} <= set(search["scores"]) and str(search["alpha"]) in search["scores"]
    rows = report["merged"]["tasks"]
    for row in rows:
        assert row["normalized_accuracy"] == pytest.approx(row["accuracy"] / report["finetuned"][row["task"]])
    assert "| Individual |" in capsys.readouterr().out


def test_cli_evaluates_a_stored_merge(text_models):
    from distac.io import read_json
    from distac.models.store import backbone_uri

    root, glue, pre, (rte, mrpc) = text_models
    assert _cli("merge", "--method", "task_arithmetic", "--alpha", 0.3, "--pretrained", backbone_uri(pre),
                "--finetuned", backbone_uri(rte), backbone_uri(mrpc), "--out", root / "merged",
                "--device", "cpu", "--no-progress") == 0
    assert _cli("evaluate", "--finetuned", rte, mrpc, "--pretrained", pre, "--merged", root / "merged",
                "--glue-dir", glue, "--max-eval", 16, "--device", "cpu", "--json", root / "merged.json") == 0
    report = read_json(root / "merged.json")
    assert report["merged"]["alpha"] == pytest.approx(0.3)
    assert [row["task"] for row in report["merged"]["tasks"]] == ["rte", "mrpc"]
    assert report["merged"]["mean_normalized_accuracy"] == pytest.approx(
        sum(r["accuracy"] / report["finetuned"][r["task"]] for r in report["merged"]["tasks"]) / 2)


def test_cli_diagnose_raw_checkpoints_gives_norms_only(text_models):
    from distac.io import read_json
    from distac.models.store import backbone_uri

    root, glue, pre, (rte, mrpc) = text_models
    assert _cli("diagnose", "--pretrained", backbone_uri(pre), "--finetuned", backbone_uri(rte), backbone_uri(mrpc),
                "--names", "rte", "mrpc", "--json", root / "raw.json") == 0
    tasks = read_json(root / "raw.json")["tasks"]
    expected = TaskVector.from_checkpoints(backbone_uri(pre), backbone_uri(mrpc)).norm()
    assert tasks[1]["norm"] == pytest.approx(expected)
    assert tasks[0]["mean_max_prob"] is None and tasks[0]["ece"] is None


def test_cli_errors_exit_2(text_models, capsys):
    root, glue, pre, (rte, mrpc) = text_models
    assert _cli("evaluate", "--finetuned", rte, "--method", "task_arithmetic") == 2
    assert "--pretrained" in capsys.readouterr().err
    assert _cli("condition", "--pretrained", pre, "--finetuned", rte, "--out", root / "x", "--lr", -1) == 2
    assert "lr" in capsys.readouterr().err
    assert _cli("extract", "--pretrained", pre, "--finetuned", root / "missing", "--out", root / "y") == 2
