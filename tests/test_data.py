"""Task data: GLUE parsing on the real files, seeded splits, error messages, vision datasets from local files."""

from __future__ import annotations

import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import distac  # noqa: F401  (applies the torchvision fix before torchvision is imported)
from distac.data import ImageExample, TaskData, TextExample, load_task, unlabeled
from distac.data.examples import sample_positions, split_off
from distac.errors import DistacError

GLUE_DIR = Path(__file__).resolve().parents[1] / "../shared/data/glue"
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="GLUE data not found beside the checkout")

# The README's table: (train rows, train label counts, dev rows, dev label counts); label index = class index.
GLUE_COUNTS = {
    "cola": (8551, {0: 2528, 1: 6023}, 1043, {0: 322, 1: 721}),
    "mrpc": (3668, {0: 1194, 1: 2474}, 408, {0: 129, 1: 279}),
    "rte": (2490, {0: 1249, 1: 1241}, 277, {0: 146, 1: 131}),
    "sst2": (67349, {0: 29780, 1: 37569}, 872, {0: 428, 1: 444}),
}


@needs_glue
@pytest.mark.parametrize("task", sorted(GLUE_COUNTS))
def test_glue_counts_match_the_readme(task):
    data = load_task(task, root=GLUE_DIR, validation_fraction=0.0)
    train_rows, train_labels, dev_rows, dev_labels = GLUE_COUNTS[task]
    assert (len(data.train), len(data.validation), len(data.test)) == (train_rows, 0, dev_rows)
    assert Counter(e.label for e in data.train) == train_labels
    assert Counter(e.label for e in data.test) == dev_labels
    assert data.num_classes == 2 == len(data.class_names)
    pairs = task in ("mrpc", "rte")
    assert all((e.text_b is not None) == pairs for e in data.train)


@needs_glue
def test_glue_format_quirks():
    mrpc = load_task("mrpc", root=GLUE_DIR, validation_fraction=0.0)
    # literal quotes survive (no quote handling) and the header (with its BOM) is not a row
    assert mrpc.train[0] == TextExample(
        'Amrozi accused his brother , whom he called " the witness " , of deliberately distorting his evidence .',
        'Referring to him as only " the witness " , Amrozi accused his brother of deliberately distorting his '
        'evidence .', 1)
    cola = load_task("cola", root=GLUE_DIR, validation_fraction=0.0)  # no header: line 1 is data
    assert cola.train[0] == TextExample("Our friends won't buy this analysis, let alone the next one we propose.",
                                        None, 1)
    assert cola.test[-1].text_a == "John talked to Bill about himself."  # last line has no newline
    rte = load_task("rte", root=GLUE_DIR, validation_fraction=0.0)
    assert rte.class_names == ["entailment", "not_entailment"]
    assert rte.train[0] == TextExample("No Weapons of Mass Destruction Found in Iraq Yet.",
                                       "Weapons of Mass Destruction Found in Iraq.", 1)


@needs_glue
@pytest.mark.parametrize("alias", ["sst2", "SST-2", "Sst_2"])
def test_task_name_aliases(alias):
    data = load_task(alias, root=GLUE_DIR, max_train=5, max_eval=5)
    assert data.name == "sst2" and data.class_names == ["negative", "positive"]


@needs_glue
def test_glue_root_defaults_to_shared_dir_beside_the_repo(monkeypatch):
    monkeypatch.delenv("DISTAC_GLUE_DIR", raising=False)
    monkeypatch.chdir("/")
    assert len(load_task("rte", max_eval=3).test) == 3


@needs_glue
def test_validation_split_is_seeded_and_disjoint():
    first = load_task("rte", root=GLUE_DIR, seed=0)
    again = load_task("rte", root=GLUE_DIR, seed=0)
    other = load_task("rte", root=GLUE_DIR, seed=1)
    assert first.train == again.train and first.validation == again.validation
    assert first.validation != other.validation
    assert len(first.validation) == 249 and len(first.train) == 2490 - 249
    everything = load_task("rte", root=GLUE_DIR, validation_fraction=0.0).train
    assert Counter(first.train) + Counter(first.validation) == Counter(everything)


@needs_glue
def test_max_train_and_max_eval_are_seeded_subsamples():
    small = load_task("mrpc", root=GLUE_DIR, max_train=50, max_eval=20, seed=3)
    again = load_task("mrpc", root=GLUE_DIR, max_train=50, max_eval=20, seed=3)
    full = load_task("mrpc", root=GLUE_DIR, seed=3)
    assert (len(small.train), len(small.validation), len(small.test)) == (50, 20, 20)
    assert small.train == again.train and small.test == again.test
    assert set(small.train) <= set(full.train) and set(small.test) <= set(full.test)


@pytest.fixture
def glue_copy(tmp_path):
    """A GLUE dir with an RTE task we can break."""
    rte = tmp_path / "RTE"
    rte.mkdir()
    header = "index\tsentence1\tsentence2\tlabel\n"
    (rte / "train.tsv").write_text(header + "0\tA \"quoted\" text\tB\tentailment\n1\tC\tD\tnot_entailment\n")
    (rte / "dev.tsv").write_text(header + "0\tE\tF\tentailment")
    return tmp_path


def test_env_dir_is_used_and_parsed(glue_copy, monkeypatch):
    monkeypatch.setenv("DISTAC_GLUE_DIR", str(glue_copy))
    data = load_task("rte", validation_fraction=0.0)
    assert data.train == [TextExample('A "quoted" text', "B", 0), TextExample("C", "D", 1)]
    assert data.test == [TextExample("E", "F", 0)]


def test_malformed_row_names_file_and_line(glue_copy):
    path = glue_copy / "RTE" / "train.tsv"
    path.write_text(path.read_text() + "2\tonly two columns\n")
    with pytest.raises(DistacError, match=r"RTE/train\.tsv, line 4: expected 4 tab-separated columns, found 2"):
        load_task("rte", root=glue_copy)


def test_unknown_label_names_file_and_line(glue_copy):
    (glue_copy / "RTE" / "dev.tsv").write_text("index\ts1\ts2\tlabel\n0\tE\tF\tmaybe\n")
    with pytest.raises(DistacError, match=r"RTE/dev\.tsv, line 2: unknown label 'maybe'"):
        load_task("rte", root=glue_copy)


def test_missing_file_and_dir_are_named(glue_copy, tmp_path):
    (glue_copy / "RTE" / "dev.tsv").unlink()
    with pytest.raises(DistacError, match=r"GLUE file not found: .*RTE/dev\.tsv"):
        load_task("rte", root=glue_copy)
    with pytest.raises(DistacError, match=r"GLUE task directory not found: .*CoLA"):
        load_task("cola", root=glue_copy)
    with pytest.raises(DistacError, match="GLUE directory not found"):
        load_task("rte", root=tmp_path / "nowhere")


def test_unknown_task_and_bad_sizes():
    with pytest.raises(DistacError, match="unknown task 'qnli'"):
        load_task("qnli")
    with pytest.raises(DistacError, match="max_train"):
        load_task("rte", max_train=0)
    with pytest.raises(DistacError, match="validation_fraction"):
        load_task("rte", validation_fraction=1.0)


def test_unlabeled_views_strip_labels():
    train = [TextExample(str(i), None, i % 2) for i in range(10)]
    data = TaskData("toy", train, [], [], 2, ["a", "b"])
    assert unlabeled(train[:2]) == [TextExample("0", None, None), TextExample("1", None, None)]
    view = data.unlabeled(4, seed=1)
    assert len(view) == 4 and all(e.label is None for e in view)
    assert view == data.unlabeled(4, seed=1) and len(data.unlabeled()) == 10
    assert {e.text_a for e in view} <= {e.text_a for e in train}


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 200), size=st.integers(0, 250), seed=st.integers(0, 10**6))
def test_sample_positions_are_sorted_distinct_and_seeded(count, size, seed):
    positions = sample_positions(count, size, seed)
    assert positions == sorted(set(positions)) == sample_positions(count, size, seed)
    assert len(positions) == min(count, size) and all(0 <= p < count for p in positions)


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 100), fraction=st.floats(0, 0.99), seed=st.integers(0, 10**6))
def test_split_off_partitions_in_order(count, fraction, seed):
    items = [TextExample(str(i), None, 0) for i in range(count)]
    rest, held = split_off(items, fraction, seed)
    assert len(held) == round(fraction * count)
    assert sorted(rest + held, key=lambda e: int(e.text_a)) == items
    assert rest == sorted(rest, key=lambda e: int(e.text_a))


def _write_image_folder(base: Path) -> None:
    for split, per_class in (("train", 3), ("test", 2)):
        for label, (name, color) in enumerate((("cat", (255, 0, 0)), ("dog", (0, 0, 255)))):
            folder = base / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), color).save(folder / f"{i}.png")


def test_image_folder(tmp_path):
    _write_image_folder(tmp_path / "pets")
    data = load_task(f"imagefolder:{tmp_path / 'pets'}", validation_fraction=0.0)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert (len(data.train), len(data.test)) == (6, 4)
    first = data.train[0]
    assert isinstance(first, ImageExample) and first.label == 0 and first.image.getpixel((0, 0)) == (255, 0, 0)
    assert [e.label for e in data.test] == [0, 0, 1, 1]
    assert all(e.label is None for e in data.unlabeled(2))
    shutil.rmtree(tmp_path / "pets" / "test")
    with pytest.raises(DistacError, match=r"image folder split not found: .*pets/test"):
        load_task(f"imagefolder:{tmp_path / 'pets'}")


def _write_mnist(raw: Path, prefix: str, labels: list[int]) -> None:
    """MNIST's idx files: big-endian magic + sizes, then uint8 pixels / labels."""
    raw.mkdir(parents=True, exist_ok=True)
    count = len(labels)
    pixels = bytes((label * 20 + i) % 256 for label in labels for i in range(28 * 28))
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, count, 28, 28) + pixels)
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, count) + bytes(labels))


def test_torchvision_dataset_from_local_root(tmp_path):
    _write_mnist(tmp_path / "MNIST" / "raw", "train", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    _write_mnist(tmp_path / "MNIST" / "raw", "t10k", [3, 1])
    data = load_task("vision:MNIST", root=tmp_path, validation_fraction=0.2, max_eval=5)
    assert data.num_classes == 10 and data.class_names[0] == "0 - zero"
    assert (len(data.train), len(data.validation), len(data.test)) == (8, 2, 2)
    assert [e.label for e in data.test] == [3, 1]
    assert sorted(e.label for e in list(data.train) + list(data.validation)) == list(range(10))
    assert data.test[0].image.size == (28, 28)
    with pytest.raises(DistacError, match="cannot read torchvision dataset MNIST"):
        load_task("vision:MNIST", root=tmp_path / "empty")
    with pytest.raises(DistacError, match="no dataset class 'NoSuchSet'"):
        load_task("vision:NoSuchSet", root=tmp_path)


# --------------------------------------------------------------------------------------------- users' files


def _spec_files(tmp_path: Path, suffix: str, body: str, test_rows: int = 2) -> dict:
    """A data spec over a train file with ``body`` (header + rows) and a plain test file of the same format."""
    sep = "\t" if suffix == ".tsv" else ","
    (tmp_path / f"train{suffix}").write_text(body)
    rows = "".join(f"t{i}{sep}{i % 2}\n" for i in range(test_rows))
    (tmp_path / f"test{suffix}").write_text(f"text{sep}label\n{rows}")
    return {"train": str(tmp_path / f"train{suffix}"), "test": str(tmp_path / f"test{suffix}")}


def test_a_tsv_text_that_starts_with_a_quote_keeps_it_by_default(tmp_path, caplog):
    from distac.data import load_task_data

    spec = _spec_files(tmp_path, ".tsv", 'text\tlabel\n"Great," she said.\t1\nfine\t0\n"Hi"\t1\n')
    task = load_task_data("t", spec, validation_fraction=0.0)
    assert [e.text_a for e in task.train] == ['"Great," she said.', "fine", '"Hi"']
    assert not caplog.records
    standard = load_task_data("t", {**spec, "quoting": "standard"}, validation_fraction=0.0)
    assert standard.train[0].text_a == "Great, she said."  # what standard quoting does to it, with a warning
    assert any("line 2" in r.message and "quoting: none" in r.message for r in caplog.records)


def test_standard_quoting_on_csv_strips_a_real_quoted_field_and_none_keeps_it(tmp_path, caplog):
    from distac.data import load_task_data

    spec = _spec_files(tmp_path, ".csv", 'text,label\n"one, two",1\n"say ""hi""",0\n')
    task = load_task_data("t", spec, validation_fraction=0.0)  # .csv: standard by default
    assert [e.text_a for e in task.train] == ["one, two", 'say "hi"'] and not caplog.records
    explicit = load_task_data("t", {**spec, "quoting": "standard"}, validation_fraction=0.0)
    assert list(explicit.train) == list(task.train)
    (tmp_path / "plain.csv").write_text('text,label\n"quoted",1\nplain,0\n')
    kept = load_task_data("t", {**spec, "train": str(tmp_path / "plain.csv"), "quoting": "none"},
                          validation_fraction=0.0)
    assert kept.train[0].text_a == '"quoted"'


def test_a_tsv_written_with_standard_quoting_is_named_not_silently_misread(tmp_path, caplog):
    from distac.data import DataError, read_rows

    (tmp_path / "q.tsv").write_text('text\tlabel\n"say ""hi"""\t1\n')
    assert read_rows(str(tmp_path / "q.tsv"))[0]["text"] == '"say ""hi"""'
    assert "row 1" in caplog.text and "quoting: standard" in caplog.text
    assert read_rows(str(tmp_path / "q.tsv"), quoting="standard")[0]["text"] == 'say "hi"'
    (tmp_path / "tab.tsv").write_text('text\tlabel\n"a\tb"\t1\n')
    with pytest.raises(DataError, match=r"tab\.tsv, row 1: 3 fields .*quoting: standard"):
        read_rows(str(tmp_path / "tab.tsv"))


def test_an_invalid_quoting_is_refused_naming_the_field(tmp_path):
    from distac.data import DataError, load_task_data, parse_data_spec, read_rows
    from distac.pipeline.params import parse_params

    spec = _spec_files(tmp_path, ".csv", "text,label\na,1\nb,0\n")
    with pytest.raises(DataError, match=r"task 'reviews': invalid data spec \(quoting: Input should be 'standard' "
                                        r"or 'none'\)"):
        load_task_data("reviews", {**spec, "quoting": "csv"})
    with pytest.raises(DistacError, match=r"tasks\.0\.data\.quoting: Input should be 'standard' or 'none'"):
        parse_params({"tasks": [{"name": "reviews", "data": {**spec, "quoting": "double"}}, {"name": "cola"}],
                      "merge": {"methods": [{"name": "task_arithmetic"}]}})
    with pytest.raises(DataError, match=r"quoting applies to \.csv/\.tsv files; this spec reads none \(a\.jsonl"):
        parse_data_spec({"train": "a.jsonl", "test": "b.jsonl", "quoting": "none"})
    with pytest.raises(DataError, match=r"train\.csv: unknown quoting 'csv'"):
        read_rows(spec["train"], quoting="csv")


def test_prompt_and_completion_name_the_text_and_label_columns(tmp_path):
    from distac.data import DataError, DataSpec, parse_data_spec

    assert DataSpec(train="a.csv", test="b.csv", prompt="question", completion="answer") == \
        DataSpec(train="a.csv", test="b.csv", text="question", label="answer")
    with pytest.raises(DataError, match="give `text` or `prompt`"):
        parse_data_spec({"train": "a.csv", "test": "b.csv", "text": "q", "prompt": "q"})


def test_rows_read_and_used_per_split(tmp_path):
    from distac.data import load_task_data

    body = "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20))
    spec = _spec_files(tmp_path, ".csv", body, test_rows=9)
    task = load_task_data("t", spec, max_train=5, max_eval=4, validation_fraction=0.25)
    assert task.rows.read == {"train": 15, "validation": 5, "test": 9}
    assert task.rows.used == {"train": 5, "validation": 4, "test": 4} and task.rows.held_out
    assert task.rows.describe() == "train 15 → 5, validation 5 (held out of train) → 4, test 9 → 4"
    assert task.rows.metrics()["test_rows_read"] == 9 and task.rows.metrics()["train_rows_used"] == 5
    given = load_task_data("t", {**spec, "validation": spec["test"]}, max_eval=100)
    assert given.rows.read == given.rows.used == {"train": 20, "validation": 9, "test": 9}
    assert not given.rows.held_out
