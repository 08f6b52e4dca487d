"""reporting: files written per record and read back, TensorBoard events TensorBoard can parse,
plots. No model is trained here."""

import csv

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from keras_fancyrnn.diagnostics import reporting

CURVES = [
    {"lstm": np.array([1e-6, 1e-3, 0.5], "float32"), "lstm/cell": np.array([0.1, 0.2, 0.3])},
    {"lstm": np.array([2e-6, 2e-3, 0.25], "float32"), "lstm/cell": np.array([0.0, 0.2, 0.3])},
]


def test_csv_is_long_format_appended_per_record_and_reads_back(tmp_path):
    path = tmp_path / "sub" / "g.csv"
    writer = reporting.CSVWriter(str(path))
    for i, curves in enumerate(CURVES):
        writer.write(step=10 * i, epoch=i, curves=curves)
        with open(path) as f:
            rows = list(csv.reader(f))
        assert tuple(rows[0]) == reporting.CSV_HEADER
        assert len(rows) == 1 + 6 * (i + 1)  # on disk as soon as written
    assert rows[1] == ["0", "0", "lstm", "0", "9.99999997e-07"]  # float32 exactly
    steps, series = reporting.read_csv(str(path))
    assert steps.tolist() == [0, 10]
    want = np.stack([c["lstm"] for c in CURVES])
    np.testing.assert_array_equal(series["lstm"].astype("float32"), want)
    np.testing.assert_allclose(series["lstm/cell"], np.stack([c["lstm/cell"] for c in CURVES]))
    reporting.CSVWriter(str(path)).write(5, 0, CURVES[0])  # a new writer starts a new file
    assert reporting.read_csv(str(path))[0].tolist() == [5]


def test_npz_holds_every_record_and_is_replaced_atomically(tmp_path):
    path = tmp_path / "g.npz"
    writer = reporting.NPZWriter(str(path))
    history = {"lstm": np.stack([CURVES[0]["lstm"]]), "lstm/cell": np.zeros((1, 3))}
    writer.write([0], [0], history)
    history = {k: np.concatenate([v, v]) for k, v in history.items()}
    writer.write([0, 10], [0, 1], history)
    saved = np.load(path)
    assert saved["steps"].tolist() == [0, 10] and saved["epochs"].tolist() == [0, 1]
    np.testing.assert_array_equal(saved["lstm/cell"], history["lstm/cell"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npz"]  # no temporary left


def _events(log_dir):
    out = []
    for path in sorted((log_dir / "gradient_norms").glob("events.out.tfevents*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(raw.numpy())
            for value in event.summary.value:
                out.append((event.step, value))
    return out


def test_tensorboard_scalars_histograms_and_image(tmp_path):
    writer = reporting.TensorBoardWriter(str(tmp_path))
    writer.write(3, CURVES[0], {"lstm/grad_ratio": 2e-6, "lstm/grad_decay": 6.5,
                                "bad": float("nan")})
    writer.write(7, CURVES[1], {"lstm/grad_ratio": 8e-6})
    writer.flush()
    events = _events(tmp_path)
    plugins = {(step, v.tag): v.metadata.plugin_data.plugin_name for step, v in events}
    assert plugins[(3, "lstm/grad_ratio")] == "scalars"
    assert plugins[(7, "lstm/grad_ratio")] == "scalars"
    assert (3, "bad") not in plugins  # non-finite scalars are left out
    assert plugins[(3, "lstm/log10_norm")] == "histograms"
    assert plugins[(3, "gradient_norms")] == "images"
    by_key = {(step, v.tag): v for step, v in events}
    ratio = tf.make_ndarray(by_key[(3, "lstm/grad_ratio")].tensor)
    assert ratio == pytest.approx(2e-6)
    hist = tf.make_ndarray(by_key[(3, "lstm/log10_norm")].tensor)
    assert hist.shape[1] == 3 and hist[:, 2].sum() == 3
    assert hist[0, 0] == pytest.approx(-6) and hist[-1, 1] == pytest.approx(np.log10(0.5))
    image = tf.make_ndarray(by_key[(3, "gradient_norms")].tensor)
    width, height, png = int(image[0]), int(image[1]), image[2]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


def test_plot_history_writes_png(tmp_path):
    history = {k: np.stack([c[k] for c in CURVES]) for k in CURVES[0]}
    path = tmp_path / "plots" / "g.png"
    fig = reporting.plot_history([0, 10], history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * 2 + 2  # heatmap + curve per series, plus colour bars


def test_bad_paths_name_the_argument():
    with pytest.raises(ValueError, match="csv_path"):
        reporting.CSVWriter(3)
    with pytest.raises(ValueError, match="npz_path"):
        reporting.NPZWriter(None)
    with pytest.raises(ValueError, match="log_dir"):
        reporting.TensorBoardWriter(1.5)


def test_json_safe_writes_strict_json():
    import json

    from keras_fancyrnn.diagnostics.reporting import json_safe

    obj = {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), np.bool_(True)],
           "c": (float("inf"), -float("inf")), "d": np.array([[1, 2]]), "e": "x"}
    text = json.dumps(json_safe(obj), allow_nan=False)  # raises on any nan/inf left
    assert json.loads(text) == {"a": "nan", "b": [1.5, 3, True], "c": ["inf", "-inf"],
                                "d": [[1, 2]], "e": "x"}
