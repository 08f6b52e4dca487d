"""Tests of keras_fancyrnn.datasets: the TFDS task builders, the generators and the text loader.

Every task's definition is re-checked from the generated inputs (not from stored outputs), on the
in-memory generators over several lengths and on the data TFDS wrote and read back. Sockets are
blocked for the whole module, so "works offline" is tested, not assumed.
"""

from __future__ import annotations

import math
import pathlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

import keras_fancyrnn.datasets as frd
from keras_fancyrnn.datasets import text as text_module

TASK_NAMES = ["adding_problem", "copy_memory", "temporal_order"]
T = 50  # the smallest published config; generating all of it takes < 1 s per task


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly (instead of hanging) on any attempt to open a network connection."""

    def refuse(*args, **kwargs):
        raise OSError("network access is blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("tfds")


def load_split(name: str, split: str, data_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = tfds.load(
        f"{name}/length_{T}", split=split, data_dir=data_dir, batch_size=-1, as_supervised=True
    )
    return tfds.as_numpy(dataset)


# --------------------------------------------------------------------------------------------------
# The task definitions, recomputed from the inputs


def check_adding(x: np.ndarray, y: np.ndarray, length: int) -> None:
    n = len(x)
    assert x.shape == (n, length, 2) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.float32
    values, markers = x[..., 0], x[..., 1]
    assert values.min() >= 0.0 and values.max() < 1.0
    assert set(np.unique(markers)) <= {0.0, 1.0}
    assert (markers.sum(axis=1) == 2).all(), "exactly two markers"
    half = length // 2
    assert (markers[:, :half].sum(axis=1) == 1).all(), "one marker in the first half"
    assert (markers[:, half:].sum(axis=1) == 1).all(), "one marker in the second half"
    np.testing.assert_allclose(y, (values * markers).sum(axis=1), rtol=0, atol=1e-6)


def check_copy(x: np.ndarray, y: np.ndarray, length: int) -> None:
    n, steps = len(x), length + 20
    assert x.shape == y.shape == (n, steps)
    assert x.dtype == y.dtype == np.int32
    symbols = x[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert (x[:, 10 : length + 9] == 0).all(), "T - 1 blanks"
    assert (x[:, length + 9] == 9).all(), "the delimiter at index T + 9"
    assert (x[:, length + 10 :] == 0).all(), "10 blanks after the delimiter"
    assert (y[:, : length + 10] == 0).all(), "blank targets for T + 10 steps"
    np.testing.assert_array_equal(y[:, length + 10 :], symbols)


def check_temporal(x: np.ndarray, y: np.ndarray, length: int) -> None:
    n = len(x)
    assert x.shape == (n, length) and x.dtype == np.int32
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.min() >= 0 and x.max() <= 5
    relevant = x >= 4
    assert (relevant.sum(axis=1) == 2).all(), "exactly two X/Y symbols"
    first = relevant.argmax(axis=1)
    second = length - 1 - relevant[:, ::-1].argmax(axis=1)
    assert (0.1 * length <= first).all() and (first <= 0.2 * length).all()
    assert (0.5 * length <= second).all() and (second <= 0.6 * length).all()
    rows = np.arange(n)
    expected = 2 * (x[rows, first] == frd.temporal_order_dataset.Y) + (
        x[rows, second] == frd.temporal_order_dataset.Y
    )
    np.testing.assert_array_equal(y, expected)


CHECKS = {
    "adding_problem": check_adding,
    "copy_memory": check_copy,
    "temporal_order": check_temporal,
}


# --------------------------------------------------------------------------------------------------
# TFDS builders


def test_builders_are_registered_with_length_configs():
    registered = tfds.list_builders(with_community_datasets=False)
    for name in TASK_NAMES:
        assert name in registered
        builder_cls = frd.TASKS[name].builder
        assert [c.name for c in builder_cls.BUILDER_CONFIGS] == [
            f"length_{t}" for t in (50, 100, 200, 400, 750, 1000)
        ]
        assert str(builder_cls.VERSION) in builder_cls.RELEASE_NOTES
        assert builder_cls.DEFAULT_BUILDER_CONFIG_NAME == "length_100"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_builder_generates_offline_and_matches_definition(name, data_dir):
    train_x, train_y = load_split(name, "train", data_dir)
    test_x, test_y = load_split(name, "test", data_dir)
    assert len(train_x) == 10_000 and len(test_x) == 1_000
    CHECKS[name](train_x, train_y, T)
    CHECKS[name](test_x, test_y, T)
    # The split is the generator's output from the split's fixed seed, in order.
    generator = frd.TASKS[name].generator
    gen_x, gen_y = generator(1_000, T, seed=frd.split_seed(name, T, "test"))
    np.testing.assert_array_equal(test_x, gen_x)
    np.testing.assert_array_equal(test_y, gen_y)
    assert not np.array_equal(train_x[:1_000], test_x), "train and test use different seeds"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_builder_info_documents_features_and_baseline(name, data_dir):
    builder = tfds.builder(f"{name}/length_{T}", data_dir=data_dir)
    info = builder.info
    assert info.supervised_keys is not None
    assert "Baseline" in info.description and "no download" in info.description
    assert "@" in info.citation
    features = info.features
    if name == "adding_problem":
        assert features["inputs"].shape == (T, 2) and features["inputs"].dtype == np.float32
        assert features["target"].shape == () and features["target"].dtype == np.float32
        assert "1/6" in info.description
    elif name == "copy_memory":
        assert features["inputs"].shape == features["targets"].shape == (T + 20,)
        assert features["inputs"].dtype == np.int32
        assert f"{10 * math.log(8) / (T + 20):.4f}" in info.description
    else:
        assert features["inputs"].shape == (T,) and features["inputs"].dtype == np.int32
        assert features["label"].names == ["XX", "XY", "YX", "YY"]
        assert "25%" in info.description


@pytest.mark.parametrize("name", TASK_NAMES)
def test_builder_is_deterministic(name, data_dir, tmp_path):
    first = load_split(name, "test", data_dir)
    second = load_split(name, "test", tmp_path)  # a fresh generation in another directory
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_custom_length_config(tmp_path):
    config = frd.LengthConfig(name="length_60_tiny", length=60, train_size=64, test_size=8)
    builder = tfds.builder("adding_problem", config=config, data_dir=tmp_path)
    builder.download_and_prepare()
    x, y = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1, as_supervised=True))
    check_adding(x, y, 60)
    assert len(x) == 64
    seed = frd.split_seed("adding_problem", 60, "train")
    np.testing.assert_array_equal(x, frd.adding_problem(64, 60, seed)[0])


def test_unknown_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"config must be one of \['length_50', .*got 'length_42'"):
        tfds.builder("adding_problem/length_42", data_dir=tmp_path)
    bad = frd.LengthConfig(name="length_1", length=1)
    with pytest.raises(ValueError, match="length must be an integer >= 10, got 1"):
        frd.TemporalOrder(config=bad, data_dir=tmp_path)
    with pytest.raises(ValueError, match="train_size must be a positive integer, got 0"):
        frd.AddingProblem(config=frd.LengthConfig(name="x", train_size=0), data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# Baselines, checked numerically on generated data


def test_adding_baseline_mse_of_predicting_one(data_dir):
    _, y = load_split("adding_problem", "train", data_dir)
    mse = float(np.mean((y - 1.0) ** 2))
    assert abs(mse - 1 / 6) < 0.01  # standard error on 10k examples: ~0.002
    assert frd.baseline("adding_problem", T) == frd.Baseline("mse", 1 / 6, "the constant 1")


def test_copy_baseline_cross_entropy(data_dir):
    x, y = load_split("copy_memory", "train", data_dir)
    # The memoryless predictor: certain blank for T + 10 steps, then uniform over symbols 1..8.
    probs = np.zeros((T + 20, 10))
    probs[: T + 10, 0] = 1.0
    probs[T + 10 :, 1:9] = 1 / 8
    picked = probs[np.arange(T + 20), y]  # (n, T + 20)
    cross_entropy = float(-np.log(picked).mean())
    expected = 10 * math.log(8) / (T + 20)
    assert cross_entropy == pytest.approx(expected, rel=1e-12)
    assert frd.baseline("copy_memory", T).value == pytest.approx(expected, rel=1e-12)
    # ... and it is the best memoryless predictor: the symbols are uniform over 1..8.
    frequencies = np.bincount(x[:, :10].ravel(), minlength=9)[1:] / x[:, :10].size
    np.testing.assert_allclose(frequencies, 1 / 8, atol=0.005)


def test_temporal_order_baseline_accuracy(data_dir):
    x, y = load_split("temporal_order", "train", data_dir)
    for constant in range(4):
        assert abs(float(np.mean(y == constant)) - 0.25) < 0.02
    assert frd.baseline("temporal_order", T).value == 0.25
    # The relevant positions cover their whole ranges.
    relevant = x >= 4
    first = relevant.argmax(axis=1)
    (lo1, hi1), _ = frd.temporal_order_dataset.positions(T)
    assert (first.min(), first.max()) == (lo1, hi1) == (5, 10)


# --------------------------------------------------------------------------------------------------
# In-memory generators


@pytest.mark.parametrize(
    "name, lengths",
    [
        ("adding_problem", [2, 3, 7, 101, 1000]),
        ("copy_memory", [1, 2, 33, 1000]),
        ("temporal_order", [10, 11, 19, 57, 1000]),
    ],
)
def test_generators_follow_the_definition_at_any_length(name, lengths):
    generator = frd.TASKS[name].generator
    for length in lengths:
        x, y = generator(300, length, seed=length)
        CHECKS[name](x, y, length)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generators_are_deterministic_and_prefix_stable(name):
    generator = frd.TASKS[name].generator
    x1, y1 = generator(1500, 20, seed=3)  # crosses a block boundary (1024)
    x2, y2 = generator(1500, 20, seed=3)
    x3, y3 = generator(2100, 20, seed=3)
    x4, _ = generator(1500, 20, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1, x3[:1500])
    np.testing.assert_array_equal(y1, y3[:1500])
    assert not np.array_equal(x1, x4)


def test_one_hot_inputs():
    tokens, label = frd.temporal_order(16, 30, seed=1)
    one_hot, label2 = frd.temporal_order(16, 30, seed=1, one_hot=True)
    assert one_hot.shape == (16, 30, 6) and one_hot.dtype == np.float32
    np.testing.assert_array_equal(one_hot.argmax(-1), tokens)
    np.testing.assert_array_equal(label, label2)
    x, y = frd.copy_memory(4, 5, seed=1, one_hot=True)
    assert x.shape == (4, 25, 10) and y.shape == (4, 25) and y.dtype == np.int32


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: frd.adding_problem(0, 10), ValueError, "n must be a positive integer, got 0"),
        (lambda: frd.adding_problem(-5, 10), ValueError, "n must be a positive integer, got -5"),
        (lambda: frd.adding_problem(2.5, 10), TypeError, "n must be an integer, got 2.5"),
        (lambda: frd.adding_problem(True, 10), TypeError, "n must be an integer"),
        (lambda: frd.adding_problem(4, 1), ValueError, "length must be an integer >= 2, got 1"),
        (lambda: frd.copy_memory(4, 0), ValueError, "length must be a positive integer, got 0"),
        (lambda: frd.temporal_order(4, 9), ValueError, "length must be an integer >= 10, got 9"),
        (lambda: frd.temporal_order(4, 20, seed=-1), ValueError, "seed must be an integer >= 0"),
        (lambda: frd.copy_memory(4, 20, seed=None), TypeError, "seed must be an integer"),
    ],
)
def test_generator_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------------
# load_numpy and baseline


def test_load_numpy_matches_the_generator(data_dir):
    x, y = frd.load_numpy("temporal_order", length=T, split="test", n=100, data_dir=data_dir)
    gen_x, gen_y = frd.temporal_order(100, T, seed=frd.split_seed("temporal_order", T, "test"))
    np.testing.assert_array_equal(x, gen_x)
    np.testing.assert_array_equal(y, gen_y)
    x1, _ = frd.load_numpy("copy_memory", T, "test", n=10, data_dir=data_dir, one_hot=True)
    assert x1.shape == (10, T + 20, 10) and x1.dtype == np.float32
    x_all, y_all = frd.load_numpy("adding_problem", T, "test", data_dir=data_dir)
    assert x_all.shape == (1000, T, 2) and y_all.shape == (1000,)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "adding"}, r"name must be one of \['adding_problem', 'copy_memory', "),
        ({"length": 42}, r"length must be one of \[50, 100, 200, 400, 750, 1000\], got 42"),
        ({"split": "validation"}, r"split must be one of \['train', 'test'\], got 'validation'"),
        ({"n": 0}, "n must be a positive integer, got 0"),
        ({"n": 10_001}, "n must be <= 10000"),
        ({"one_hot": True}, "one_hot applies to token inputs"),
    ],
)
def test_load_numpy_bad_input(kwargs, message, tmp_path):
    arguments = {"name": "adding_problem", "length": T, "data_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=message):
        frd.load_numpy(**arguments)
    assert not any(tmp_path.iterdir()), "nothing is generated for a bad call"


def test_baseline_bad_input():
    with pytest.raises(ValueError, match="name must be one of"):
        frd.baseline("copy", 100)
    with pytest.raises(ValueError, match="length must be a positive integer, got 0"):
        frd.baseline("copy_memory", 0)


# --------------------------------------------------------------------------------------------------
# Text


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. ü€\n"


@pytest.fixture
def text_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


def test_vocabulary_round_trip():
    vocab = frd.CharVocabulary.from_text(TEXT)
    assert list(vocab.chars) == sorted(set(TEXT))
    assert len(vocab) == len(set(TEXT))
    ids = vocab.encode(TEXT)
    assert ids.dtype == np.int32
    assert vocab.decode(ids) == TEXT
    assert vocab.char_to_id["ü"] == vocab.chars.index("ü")
    assert frd.CharVocabulary(**vocab.get_config()) == vocab
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("xyz#")
    with pytest.raises(ValueError, match="ids must be in"):
        vocab.decode([len(vocab)])


def test_text_dataset_reads_a_local_file(text_file):
    seq_len, batch_size = 16, 4
    dataset, vocab = frd.text_dataset(text_file, seq_len, batch_size, shuffle=False)
    inputs_spec, targets_spec = dataset.element_spec
    assert inputs_spec.shape == targets_spec.shape == (batch_size, seq_len)
    assert inputs_spec.dtype.name == targets_spec.dtype.name == "int32"
    batches = list(tfds.as_numpy(dataset))
    inputs = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    text = TEXT * 3
    windows = (len(text) - 1) // seq_len
    kept = windows // batch_size * batch_size  # drop_remainder
    assert inputs.shape == (kept, seq_len)
    assert vocab.decode(inputs) == text[: kept * seq_len]
    assert vocab.decode(targets) == text[1 : kept * seq_len + 1], "targets: the next characters"
    # A str path and shuffling give the same windows, in another order.
    shuffled, vocab2 = frd.text_dataset(str(text_file), seq_len, batch_size, seed=1)
    assert vocab2 == vocab
    shuffled_inputs = np.concatenate([b[0] for b in tfds.as_numpy(shuffled)])
    assert not np.array_equal(shuffled_inputs, inputs)
    all_windows = {tuple(w) for w in vocab.encode(text)[: windows * seq_len].reshape(-1, seq_len)}
    assert {tuple(w) for w in shuffled_inputs} <= all_windows


def test_text_dataset_from_text_and_shared_vocabulary():
    vocab = frd.CharVocabulary.from_text(TEXT)
    dataset, vocab2 = frd.text_dataset(
        TEXT[:40], 8, 2, vocabulary=vocab, shuffle=False, drop_remainder=False
    )
    assert vocab2 is vocab
    assert sum(int(b[0].shape[0]) for b in dataset) == (40 - 1) // 8


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (("missing.txt", 8, 2), {}, FileNotFoundError, "no such file: 'missing.txt'"),
        (("too short", 100, 2), {}, ValueError, "fewer than seq_len \\+ 1 = 101"),
        (("a b c d e f g", 2, 10), {}, ValueError, "fewer than batch_size=10"),
        (("a b c d e f g", 0, 1), {}, ValueError, "seq_len must be a positive integer, got 0"),
        (("a b c d e f g", 2, 0), {}, ValueError, "batch_size must be a positive integer, got 0"),
        ((b"a b c", 2, 1), {}, TypeError, "path_or_text must be a str or os.PathLike"),
    ],
)
def test_text_dataset_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        frd.text_dataset(*args, **kwargs)


def test_tiny_shakespeare_without_network_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(frd.DatasetUnavailableError, match="download=False.*text_dataset\\(path"):
        frd.tiny_shakespeare(data_dir=tmp_path, download=False)
    # With download allowed, an unreachable host gives up at once (sockets are blocked here).
    with pytest.raises(frd.DatasetUnavailableError, match="unreachable.*text_dataset"):
        frd.tiny_shakespeare(data_dir=tmp_path, timeout=0.1)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'validation', 'test'\]"):
        frd.tiny_shakespeare(split="valid")


def test_tiny_shakespeare_pipeline_shares_the_corpus_vocabulary(monkeypatch):
    texts = {
        "train": "to be or not to be\n" * 20,
        "validation": "that is the question?",
        "test": "!",
    }
    monkeypatch.setattr(text_module, "_tiny_shakespeare_texts", lambda *args: texts)
    dataset, vocab = frd.tiny_shakespeare(seq_len=5, batch_size=2, split="validation")
    assert set(vocab.chars) == set("".join(texts.values()))
    inputs, targets = next(iter(tfds.as_numpy(dataset)))
    assert inputs.shape == targets.shape == (2, 5)
