"""Where the gradient-norm numbers go: CSV/NPZ files, TensorBoard summaries, matplotlib plots.

The monitor computes; this module only writes. Every writer writes a record as soon as it gets
it, so a crash mid-fit loses at most the record being written.

* ``CSVWriter``: long ("tidy") format, one row per record, series and timestep:
  ``step,epoch,series,timestep,norm``; appended and flushed per record.
* ``NPZWriter``: ``steps``, ``epochs`` and one ``[n_records, T]`` array per series; the whole
  file is rewritten per record through a temporary file and an atomic rename.
* ``TensorBoardWriter``: under ``log_dir/gradient_norms``: the derived scalars, a histogram of
  ``log10 ‖∂ℓ/∂h_t‖`` over ``t`` per series, and the curves as an image (needs matplotlib).
* ``plot_history``: a heatmap (record × timestep, log colour scale) and the first and latest
  curves, one row per series.
* ``json_safe``: results as strict JSON (the examples' ``results.json``).

matplotlib is imported only when an image or plot is asked for.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile

import numpy as np

from keras_fancyrnn._tf import tf

CSV_HEADER = ("step", "epoch", "series", "timestep", "norm")


def json_safe(obj):
    """``obj`` with numpy arrays/scalars as Python values and nan/inf as the strings ``"nan"``,
    ``"inf"``, ``"-inf"``, so that ``json.dump`` writes strict JSON; dicts, lists and tuples are
    converted recursively."""
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is a test dependency
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (or keras_fancyrnn[examples])"
        ) from err
    return matplotlib, Figure, FigureCanvasAgg


def norm_label(key: str) -> str:
    """``‖∂ℓ/∂h_t‖``, ``‖∂ℓ/∂c_t‖``, ``‖∂ℓ/∂x_t‖`` or ``‖Σ h_{t-1} ⊗ δ_t‖`` (a recurrent
    kernel's BPTT term) for a series key."""
    last = key.rsplit("/", 1)[-1]
    return {"cell": "‖∂ℓ/∂c_t‖", "input": "‖∂ℓ/∂x_t‖",
            "recurrent_kernel": "‖Σᵢ h_{t-1} ⊗ δ_t‖"}.get(last, "‖∂ℓ/∂h_t‖")


def _parent_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


class CSVWriter:
    """Appends records to ``path`` in long format (``CSV_HEADER``); truncates on its first write.

    Norms are written with 9 significant digits (exact for float32).
    """

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"csv_path must be a file path, got {path!r}")
        self.path = os.fspath(path)
        self._started = False

    def write(self, step: int, epoch: int, curves: dict[str, np.ndarray]) -> None:
        mode = "a" if self._started else "w"
        if not self._started:
            _parent_dir(self.path)
        with open(self.path, mode, newline="") as f:
            writer = csv.writer(f)
            if not self._started:
                writer.writerow(CSV_HEADER)
            for series, curve in curves.items():
                for t, value in enumerate(np.asarray(curve, dtype=np.float64)):
                    writer.writerow((int(step), int(epoch), series, t, f"{value:.9g}"))
            f.flush()
        self._started = True


def read_csv(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reads a ``CSVWriter`` file back: ``(steps [n_records], {series: [n_records, T]})``.

    A record is a run of rows; a new one starts where a (series, timestep) pair repeats."""
    records: list[dict[str, dict[int, float]]] = []
    steps: list[int] = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key, t = row["series"], int(row["timestep"])
            if not records or t in records[-1].get(key, {}):
                records.append({})
                steps.append(int(row["step"]))
            records[-1].setdefault(key, {})[t] = float(row["norm"])
    keys = list(dict.fromkeys(k for r in records for k in r))
    out = {}
    for key in keys:
        width = max((max(r[key]) + 1 for r in records if key in r), default=0)
        arr = np.full((len(records), width), np.nan)
        for i, r in enumerate(records):
            for t, v in r.get(key, {}).items():
                arr[i, t] = v
        out[key] = arr
    return np.asarray(steps, dtype=np.int64), out


class NPZWriter:
    """Keeps ``path`` an ``.npz`` of ``steps``, ``epochs`` and every series (key = series name)."""

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"npz_path must be a file path, got {path!r}")
        self.path = os.fspath(path)

    def write(self, steps, epochs, history: dict[str, np.ndarray]) -> None:
        _parent_dir(self.path)
        fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(self.path)))
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, steps=np.asarray(steps), epochs=np.asarray(epochs), **history)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def curves_png(curves: dict[str, np.ndarray], title: str = "") -> bytes:
    """The curves (log scale over timestep) as PNG bytes."""
    _, Figure, FigureCanvasAgg = _import_matplotlib()
    fig = Figure(figsize=(6, 3.5), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, curve in curves.items():
        c = np.asarray(curve, dtype=np.float64)
        ax.plot(np.arange(len(c)), np.where(c > 0, c, np.nan), label=key)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("mean gradient norm")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _summary_metadata(plugin: str, data_class: str):
    """The ``SummaryMetadata`` TensorBoard's own ``tf.summary.scalar/histogram/image`` attach
    (plugin name, empty version-0 plugin content, data class), built from TensorFlow's protos so
    that no ``tensorboard`` package is needed to write them."""
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin, content=b""),
        data_class=getattr(summary_pb2, data_class),
    )


def _histogram_buckets(values: np.ndarray, bins: int = 30) -> np.ndarray:
    """TensorBoard's histogram tensor: ``[bins, 3]`` rows of (left edge, right edge, count)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([[lo - 0.5, hi + 0.5, float(values.size)]])
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


class TensorBoardWriter:
    """TensorBoard event files under ``log_dir/gradient_norms`` (give it the Keras TensorBoard
    callback's ``log_dir`` to see both side by side): per record, the derived scalars, a histogram
    of ``log10 ‖∂ℓ/∂h_t‖`` over ``t`` per series (tag ``<series>/log10_norm``), and the curves as
    one image (tag ``gradient_norms``; skipped without matplotlib).

    Written with ``tf.summary.write`` and TensorBoard's plugin metadata, which is what
    ``tf.summary.scalar/histogram/image`` do, so it works without the ``tensorboard`` package
    (``tensorflow-cpu`` does not install it)."""

    def __init__(self, log_dir: str, images: bool = True):
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a directory path, got {log_dir!r}")
        import importlib.util

        if importlib.util.find_spec("tensorflow") is None:  # found without importing it
            raise ImportError(
                "log_dir: TensorBoard event files are written with TensorFlow's summary writer, "
                "and TensorFlow is not installed; install it (`pip install tensorflow-cpu`), or "
                "record with csv_path= / npz_path= instead"
            )
        self.log_dir = os.path.join(os.fspath(log_dir), "gradient_norms")
        self.images = images
        self._writer = None
        self._meta = None

    def write(self, step: int, curves: dict[str, np.ndarray], scalars: dict[str, float]) -> None:
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
            self._meta = {
                "scalar": _summary_metadata("scalars", "DATA_CLASS_SCALAR"),
                "histogram": _summary_metadata("histograms", "DATA_CLASS_TENSOR"),
                "image": _summary_metadata("images", "DATA_CLASS_BLOB_SEQUENCE"),
            }
        step = int(step)
        with self._writer.as_default():
            for name, value in scalars.items():
                if np.isfinite(value):
                    tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                                     metadata=self._meta["scalar"])
            for key, curve in curves.items():
                c = np.asarray(curve, dtype=np.float64)
                c = c[np.isfinite(c) & (c > 0)]
                if c.size:
                    tf.summary.write(f"{key}/log10_norm", _histogram_buckets(np.log10(c)),
                                     step=step, metadata=self._meta["histogram"])
            if self.images and curves:
                try:
                    png = curves_png(curves, title=f"step {step}")
                except ImportError:
                    self.images = False
                else:
                    height, width = tf.io.decode_png(png).shape[:2]
                    blob = tf.constant([str(width).encode(), str(height).encode(), png])
                    tf.summary.write("gradient_norms", blob, step=step,
                                     metadata=self._meta["image"])
        self._writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()


def plot_history(steps, history: dict[str, np.ndarray], path: str | None = None):
    """One row per series: left, ``log10`` norms as a heatmap (rows: records, by step; columns:
    timestep); right, the first (dashed) and latest curves on a log scale. Saves to ``path`` if
    given; returns the ``matplotlib.figure.Figure``."""
    _, Figure, FigureCanvasAgg = _import_matplotlib()
    keys = list(history)
    steps = np.asarray(steps)
    fig = Figure(figsize=(11, 2.8 * len(keys)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for row, key in zip(axes, keys):
        data = np.asarray(history[key], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(data > 0, np.log10(data), np.nan)
        heat, curve = row
        n, width = data.shape
        extent = (-0.5, width - 0.5, n - 0.5, -0.5)
        im = heat.imshow(logs, aspect="auto", interpolation="nearest", cmap="viridis",
                         extent=extent)
        fig.colorbar(im, ax=heat, label=f"log10 {norm_label(key)}")
        ticks = np.unique(np.linspace(0, n - 1, min(n, 6)).astype(int))
        heat.set_yticks(ticks)
        heat.set_yticklabels([str(steps[i]) for i in ticks] if len(steps) == n else ticks)
        heat.set_ylabel("step")
        heat.set_xlabel("timestep t")
        heat.set_title(key)
        t = np.arange(width)
        if n > 1:
            curve.plot(t, np.where(data[0] > 0, data[0], np.nan), "--", color="gray",
                       label=f"step {steps[0]}" if len(steps) else "first")
        curve.plot(t, np.where(data[-1] > 0, data[-1], np.nan), color="C0",
                   label=f"step {steps[-1]}" if len(steps) else "latest")
        curve.set_yscale("log")
        curve.set_xlabel("timestep t")
        curve.set_ylabel(norm_label(key))
        curve.legend(fontsize="small")
    fig.tight_layout()
    if path is not None:
        _parent_dir(path)
        fig.savefig(path)
    return fig


__all__ = [
    "CSV_HEADER",
    "CSVWriter",
    "NPZWriter",
    "TensorBoardWriter",
    "curves_png",
    "norm_label",
    "plot_history",
    "read_csv",
]
