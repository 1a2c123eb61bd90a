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
