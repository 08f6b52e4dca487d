"""Smoke tests of the examples: each runs end to end with tiny flags and writes its
outputs; the main job's report has one row per model (SimpleRNN, LSTM, GRU).

Each example runs once as a program (``python examples/<name>.py --flags``) in a subprocess, the
way a user runs it, so flag parsing, ``main`` and the files under ``--out`` are exercised. Cheaper
checks (every example's flags and ``--help`` text, the shared flag names, the documented commands,
the main job's helpers, the char-RNN's offline fallback text, the shared module
``examples/_cli.py``) load the example modules in this process, one TensorFlow import for all of
them; only the main job's ``--help`` runs as a program, to see what reaches stderr.
A missing example fails its tests.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
ALL = (
    "vanishing_gradients",
    "adding_problem",
    "exploding_gradients",
    "char_rnn",
    "bidirectional_stacked",
    "export_savedmodel",
    "custom_loop_monitor",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _path(name: str) -> str:
    return os.path.join(EXAMPLES, f"{name}.py")


def _require(name: str) -> str:
    path = _path(name)
    if not os.path.exists(path):
        pytest.fail(f"examples/{name}.py is missing")
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def run_example(name: str, *args: str, timeout: float = 120, cwd: str | os.PathLike = ROOT) -> str:
    """Runs ``examples/<name>.py args`` in a subprocess (in ``cwd``, the repository root by
    default); fails with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, _require(name), *args], cwd=cwd, env=_env(), capture_output=True,
        text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"examples/{name}.py {' '.join(args)} exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def _event_files(directory: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(directory) for f in files
            if f.startswith("events.out.tfevents")]


# ------------------------------------------------------------------------------------------------
# Loading examples in-process, and --help
# ------------------------------------------------------------------------------------------------
_LOADED: dict[str, object] = {}
# TensorFlow's start-up lines that the examples must not show (tests/test_examples.py checks
# stderr for them without TF_CPP_MIN_LOG_LEVEL set)
TF_STARTUP_NOISE = ("oneDNN custom operations", "cpu_feature_guard",
                    "This TensorFlow binary is optimized", "absl::InitializeLog")


def _examples_on_path() -> None:
    """What ``python examples/<name>.py`` does for the example: its folder on ``sys.path``, so
    that the shared ``examples/_cli.py`` imports."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)


def cli_module():
    """The examples' shared module ``examples/_cli.py``."""
    _examples_on_path()
    return importlib.import_module("_cli")


def load_example(name: str):
    """``examples/<name>.py`` as a module (not run), with its absl flags registered only while it
    loads: the examples share flag names (``--out``), which absl refuses to define twice from
    different modules. Returns ``(module, {flag name: help text})``."""
    from absl import flags

    if name in _LOADED:
        return _LOADED[name]
    module_name = f"_example_{name}"
    spec = importlib.util.spec_from_file_location(module_name, _require(name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    _examples_on_path()
    before = set(flags.FLAGS)
    spec.loader.exec_module(module)
    defined = {n: flags.FLAGS[n].help for n in set(flags.FLAGS) - before}
    for n in defined:  # free the names for the next example
        delattr(flags.FLAGS, n)
    _LOADED[name] = (module, defined)
    return _LOADED[name]


@pytest.mark.parametrize("name", ALL)
def test_example_defines_its_flags_with_help(name):
    module, defined = load_example(name)
    assert "out" in defined, f"examples/{name}.py has no --out flag"
    assert all(text for text in defined.values()), "every flag needs a help text"
    assert callable(getattr(module, "main", None))
    assert (module.__doc__ or "").strip(), "the module docstring is the --help headline"


# reStructuredText and LaTeX that --help would print raw
HELP_MARKUP = {
    "``literal``": r"``",
    "an RST role (:math:`x`)": r":[a-z]+:`",
    "an RST directive (.. math::)": r"(?m)^\s*\.\. [a-z]+::",
    "a LaTeX command (\\frac)": r"\\[A-Za-z]+",
    "LaTeX math ($x$)": r"\$[^$\n]+\$",
    "a LaTeX sub- or superscript (x_{t-1})": r"[_^]\{",
}


@pytest.mark.parametrize("name", ALL)
def test_help_text_is_plain(name):
    """absl's --help prints the module docstring and every flag's help as they are: plain text,
    no reStructuredText or LaTeX."""
    module, defined = load_example(name)
    assert "%" not in module.__doc__, "absl %-formats the docstring for --help (%s: the program)"
    texts = {"the module docstring": module.__doc__, **{f"--{k}": v for k, v in defined.items()}}
    for where, text in texts.items():
        for what, pattern in HELP_MARKUP.items():
            match = re.search(pattern, text)
            assert not match, f"{where} of examples/{name}.py has {what}: {match.group(0)!r}"


# One name per meaning across the examples; these are the names the shared ones replaced.
RENAMED = {"seq_len": "length", "max_steps": "steps", "models": "cells", "train_size": "num_train",
           "samples": "num_train", "val_size": "num_val", "method": "clip_method",
           "threshold": "clip_threshold"}


@pytest.mark.parametrize("name", ALL)
def test_examples_share_one_flag_vocabulary(name):
    """--steps is training steps, --length the sequence length T, --lengths a sweep of them."""
    _, defined = load_example(name)
    assert not set(RENAMED) & set(defined), f"renamed: {RENAMED}"
    helps = {flag: text.lower() for flag, text in defined.items()}
    if "steps" in helps:
        assert "training steps" in helps["steps"]
    for flag, text in helps.items():
        if flag in ("length", "lengths"):
            assert f"sequence {flag} t" in text, (flag, text)
        else:
            assert "length t" not in text and "lengths t" not in text, (flag, text)
    assert "length" in helps or "lengths" in helps, "every example has a sequence length"


def _example_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(example, [flag names])`` of every ``python examples/<name>.py ...`` command in text."""
    text = text.replace("\\\n", " ")  # shell line continuations
    return [(m.group(1), re.findall(r"(?<![\w-])--(\w+)", m.group(2)))
            for m in re.finditer(r"python examples/(\w+)\.py([^\n`]*)", text)]


def test_documented_commands_use_flags_that_exist():
    """Every example command in the README and in the examples' docstrings parses: each flag it
    passes is one the example defines (``--noX`` for a boolean X; ``--help`` is absl's)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = _example_commands(f.read())
    for name in ALL:
        commands += _example_commands(load_example(name)[0].__doc__)
    assert {name for name, _ in commands} == set(ALL), "each example has a documented command"
    for name, used in commands:
        _, defined = load_example(name)
        for flag in used:
            known = flag in defined or flag == "help" or (
                flag.startswith("no") and flag[2:] in defined)
            assert known, f"examples/{name}.py has no --{flag}"


def test_help_on_the_command_line_without_startup_noise():
    """The real ``--help`` of the main job (absl prints it and exits with 1), run as a user runs
    it: without TF_CPP_MIN_LOG_LEVEL, TensorFlow's start-up lines must not reach stderr."""
    env = _env()
    del env["TF_CPP_MIN_LOG_LEVEL"]
    proc = subprocess.run([sys.executable, _path("vanishing_gradients"), "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    for flag in ("--out", "--length", "--cells", "--steps", "--clip_method"):
        assert flag in proc.stdout, proc.stdout[-2000:]
    for what, pattern in HELP_MARKUP.items():
        assert not re.search(pattern, proc.stdout), f"--help shows {what}"
    for noise in TF_STARTUP_NOISE:
        assert noise not in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# The shared module: quiet start-up, progress lines
# ------------------------------------------------------------------------------------------------
# What TensorFlow writes to stderr while it is imported (the format of its C++ log lines),
# then one line of each other severity and a Python warning
IMPORT_STDERR = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1000000000.000000    1234 port.cc:153] oneDNN custom operations are on. You may see \
slightly different numerical results due to floating-point round-off errors.
I0000 00:00:1000000000.000000    1234 cpu_feature_guard.cc:227] This TensorFlow binary is \
optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the \
appropriate compiler flags.
W0000 00:00:1000000000.000000    1234 some_op.cc:12] a TensorFlow warning
E0000 00:00:1000000000.000000    1234 util.cc:131] a TensorFlow error
something.py:3: UserWarning: a Python warning
"""


def test_drop_startup_noise_follows_tf_cpp_min_log_level():
    cli = cli_module()
    lines = IMPORT_STDERR.splitlines(keepends=True)
    assert cli.drop_startup_noise(IMPORT_STDERR, 0) == IMPORT_STDERR
    assert cli.drop_startup_noise(IMPORT_STDERR, 1) == "".join(lines[-3:])
    assert cli.drop_startup_noise(IMPORT_STDERR, 2) == "".join(lines[-2:])
    assert cli.drop_startup_noise(IMPORT_STDERR, 3) == lines[-1]


def test_format_duration():
    cli = cli_module()
    cases = {-1: "0s", 0: "0s", 59.4: "59s", 59.6: "1m00s", 65: "1m05s", 3599: "59m59s",
             3600: "1h00m", 7620: "2h07m", 100 * 3600: "100h00m"}
    assert {s: cli.format_duration(s) for s in cases} == cases


def test_progress_reports_k_of_n_elapsed_and_time_left():
    cli = cli_module()
    now = [1000.0]
    out = io.StringIO()
    progress = cli.Progress(4, clock=lambda: now[0], stream=out)
    lines = [progress.start("first")]
    now[0] += 30
    lines += [progress.finish("first: solved"), progress.start("second")]
    now[0] += 90  # two units done in 120 s: 60 s each, two left
    lines.append(progress.finish("second"))
    lines.append(progress.finish("third"))  # 2m00s over 3 units: 40 s for the last one
    now[0] += 3600
    lines.append(progress.finish("fourth"))
    assert lines == [
        "[1/4] first (elapsed 0s)",
        "[1/4] first: solved (elapsed 30s, about 1m30s left)",
        "[2/4] second (elapsed 30s, about 1m30s left)",
        "[2/4] second (elapsed 2m00s, about 2m00s left)",
        "[3/4] third (elapsed 2m00s, about 40s left)",
        "[4/4] fourth (elapsed 1h02m, done)",
    ]
    assert out.getvalue() == "".join(line + "\n" for line in lines), "printed as returned"
    with pytest.raises(ValueError, match="already done"):
        progress.finish("fifth")
    with pytest.raises(ValueError, match="none is left to start"):
        progress.start("fifth")
    with pytest.raises(ValueError, match="total must be a positive integer"):
        cli.Progress(0)


def test_progress_start_alone_counts_the_previous_unit_done():
    """Loops that only announce each unit: starting the next one ends the last."""
    cli = cli_module()
    now = [0.0]
    progress = cli.Progress(3, clock=lambda: now[0], stream=io.StringIO())
    lines = [progress.start("a")]
    now[0] = 10
    lines.append(progress.start("b"))
    now[0] = 30
    lines += [progress.start("c"), progress.finish("c")]
    assert lines == ["[1/3] a (elapsed 0s)", "[2/3] b (elapsed 10s, about 20s left)",
                     "[3/3] c (elapsed 30s, about 15s left)", "[3/3] c (elapsed 30s, done)"]


# ------------------------------------------------------------------------------------------------
# The main job
# ------------------------------------------------------------------------------------------------
def test_vanishing_gradients_writes_the_report(tmp_path):
    out = tmp_path / "vg"
    stdout = run_example(
        "vanishing_gradients", f"--out={out}", "--length=12", "--units=4", "--steps=8",
        "--eval_every=4", "--record_every=2", "--batch_size=8", "--num_train=64",
        "--num_test=32", "--probe_size=16",
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["SimpleRNN", "LSTM", "GRU"]
    assert math.isclose(results["baseline_mse"], 1 / 6)
    for row in results["rows"]:
        assert row["steps"] == 8
        assert math.isfinite(row["final_test_mse"])
        assert 0.0 <= row["clip_rate"] <= 1.0
        assert row["skipped_steps"] == 0
        for key in ("grad_ratio_init", "grad_ratio_final", "vs_baseline"):
            assert key in row
    for cell in ("simple_rnn", "lstm", "gru"):
        model = results["models"][cell]
        assert model["record_steps"] == [0, 2, 4, 6, 8]
        assert model["eval_steps"] == [0, 4, 8]
        assert len(model["curve_init"]) == len(model["curve_final"]) == 12
        assert (out / cell / "grad_norms.csv").stat().st_size > 0
        assert _event_files(str(out / "tensorboard" / cell / "gradient_norms"))
        assert _event_files(str(out / "tensorboard" / cell))  # loss, test MSE, clip stats
    table = (out / "results.md").read_text()
    report = (out / "report.md").read_text()
    for text in (table, report, stdout):
        for model in ("SimpleRNN", "LSTM", "GRU"):
            assert f"| {model} |" in text
    for png in ("gradient_norms.png", "heatmap.png", "test_mse.png"):
        assert _is_png(str(out / png))
        assert f"]({png})" in report
    # the monitor's diagnosis, printed and in the report, one line per finding or model
    for text in (report, stdout):
        assert "Diagnosis (GradientNormMonitor.summary()" in text
    for model in results["models"].values():
        for finding in model["findings"]:
            assert finding["kind"] in ("vanishing", "exploding", "saturated")
            assert finding["text"] in report


def test_vanishing_gradients_helpers():
    vg, _ = load_example("vanishing_gradients")
    assert vg.format_ratio(2.5e-3, 0) == "2.50e-03"
    assert vg.format_ratio(2.5e-21, 7) == "< 2.50e-21 (7 t at 0)"
    row = {"model": "LSTM", "final_test_mse": 0.0012, "vs_baseline": 0.0072, "solved": True,
           "first_solved_step": 800, "grad_ratio_init": 1e-8, "grad_ratio_final": 0.07,
           "underflow_init": 0, "underflow_final": 0, "clip_rate": 0.01, "skipped_steps": 0,
           "steps": 1500, "seconds": 70.0}
    table = vg.markdown_table([row])
    assert "| LSTM | 0.0012 | 0.007 | yes (step 800) | 1.00e-08 | 7.00e-02 | 0.01 | 0 |" in table
    with pytest.raises(ValueError, match="cells must be a non-empty subset"):
        vg.Config(cells=("lstm", "transformer"))
    with pytest.raises(ValueError, match="multiple of eval_every"):
        vg.Config(steps=150, eval_every=100)
    with pytest.raises(ValueError, match="probe_size"):
        vg.Config(num_test=10, probe_size=20)


# ------------------------------------------------------------------------------------------------
# The other examples
# ------------------------------------------------------------------------------------------------
def test_adding_problem_sweep_stops_when_solved(tmp_path):
    out = tmp_path / "adding"
    # --solved_mse 10: every setting counts as solved at its first evaluation, so each must stop
    # there (after eval_every steps, not --steps).
    run_example(
        "adding_problem", f"--out={out}", "--cells=lstm,chrono_lstm", "--lengths=8",
        "--clipping=on,off", "--units=4", "--steps=20", "--eval_every=5",
        "--num_train=64", "--num_test=32", "--batch_size=8", "--solved_mse=10",
    )
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["cell"], r["length"], r["clipping"]) for r in rows] == [
        ("lstm", 8, "on"), ("lstm", 8, "off"), ("chrono_lstm", 8, "on"), ("chrono_lstm", 8, "off")
    ]
    for r in rows:
        assert r["solved"] and r["solved_step"] == 5 and r["steps"] == 5
        assert r["stopped_by"] == "solved"
        assert (r["clip_rate"] is None) == (r["clipping"] == "off")
    table = (out / "results.md").read_text()
    assert table.count("| lstm | 8 |") == 2 and table.count("| chrono_lstm | 8 |") == 2


def test_char_rnn_on_a_text_file(tmp_path):
    text_file = tmp_path / "input.txt"
    text_file.write_text("the quick brown fox jumps over the lazy dog.\n" * 30)
    out = tmp_path / "char"
    run_example(
        "char_rnn", f"--out={out}", f"--text_file={text_file}", "--layers=2", "--units=8",
        "--embedding_dim=4", "--length=16", "--batch_size=4", "--steps=4", "--eval_every=2",
        "--record_every=2", "--sample_length=20", "--bptt_truncate=5",
    )
    summary = json.loads((out / "results.json").read_text())
    assert summary["source"] == f"file {text_file}"
    assert summary["vocabulary_size"] == len(set(text_file.read_text()))
    assert [e["step"] for e in summary["evaluations"]] == [2, 4]
    assert all(math.isfinite(e["val_loss"]) for e in summary["evaluations"])
    assert set(summary["grad_ratio_final"]) >= {"lstm_1", "lstm_2"}
    assert len(summary["sample"]) == 20
    assert (out / "samples.txt").read_text().startswith(summary["prime"])
    assert _is_png(str(out / "grad_norms.png"))
    assert (out / "grad_norms.csv").stat().st_size > 0
    assert "val perplexity" in (out / "results.md").read_text()


def test_char_rnn_falls_back_to_the_builtin_text_offline(tmp_path):
    """No --text_file and an empty TFDS data directory (tiny_shakespeare not prepared, download
    off): the built-in text, without touching the network."""
    char_rnn, _ = load_example("char_rnn")
    config = char_rnn.Config(data_dir=str(tmp_path / "tfds"), length=32, batch_size=8)
    data = char_rnn.load_text(config)
    assert data["source"].startswith("built-in")
    x, y = next(iter(data["validation"]))
    assert x.shape[1] == y.shape[1] == 32
    assert data["vocabulary"].decode(x.numpy()[0]) in char_rnn.BUILTIN_TEXT
    assert 1 < char_rnn.unigram_perplexity(data["train_ids"], len(data["vocabulary"])) < len(
        data["vocabulary"])


def test_exploding_gradients(tmp_path):
    out = tmp_path / "exploding"
    # Too short and small for plain SGD to diverge: the summary must say so, not "step None".
    stdout = run_example(
        "exploding_gradients", f"--out={out}", "--length=10", "--units=8", "--epochs=2",
        "--num_train=64", "--num_test=32", "--batch_size=16",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert {"plain", "clipped"} <= set(summary)
    assert summary["plain"]["steps"] == summary["clipped"]["steps"] == 2 * 64 // 16
    text = (out / "summary.md").read_text()
    for printed in (text, stdout):
        assert "None" not in printed
        assert "Plain SGD: no non-finite gradient norm or loss in 8 steps." in printed


def test_exploding_gradients_nonfinite_report():
    eg, _ = load_example("exploding_gradients")
    run = {"steps": 64, "first_nonfinite_grad_norm_step": None, "first_nonfinite_loss_step": None}
    assert eg.nonfinite_report(run) == "no non-finite gradient norm or loss in 64 steps"
    run |= {"first_nonfinite_grad_norm_step": 32, "first_nonfinite_loss_step": 29}
    assert eg.nonfinite_report(run) == ("first non-finite gradient norm at step 32 of 64, "
                                        "first non-finite loss at step 29 of 64")
    run["first_nonfinite_grad_norm_step"] = None
    assert eg.nonfinite_report(run) == ("gradient norm finite in all 64 steps, "
                                        "first non-finite loss at step 29 of 64")


def test_custom_loop_monitor(tmp_path):
    """The monitor outside fit: records at the loop's own steps, clip statistics passed in."""
    out = tmp_path / "custom"
    stdout = run_example(
        "custom_loop_monitor", f"--out={out}", "--length=8", "--units=4", "--steps=6",
        "--batch_size=8", "--probe_size=4", "--record_every=2",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [0, 2, 4, 5]
    assert len(summary["grad_ratio"]) == 4 and len(summary["curve_at_init"]) == 8
    assert summary["clip_stats"]["applied_steps"] + summary["clip_stats"]["skipped_steps"] == 6
    assert len(summary["losses"]) == 6 and all(math.isfinite(v) for v in summary["losses"])
    assert "clip rate" in stdout and "|dl/dh_1| / |dl/dh_T|" in stdout
    assert (out / "gradient_norms.csv").stat().st_size > 0
    assert _is_png(str(out / "gradient_norms.png"))


def test_bidirectional_stacked(tmp_path):
    out = tmp_path / "bistack"
    run_example(
        "bidirectional_stacked", f"--out={out}", "--layers=2", "--units=4", "--length=6",
        "--num_train=32", "--num_val=16", "--epochs=2", "--batch_size=16",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert {"bidirectional", "unidirectional"} <= set(summary)
    assert (out / "loss_curve.csv").stat().st_size > 0


def test_export_savedmodel_with_a_relative_out(tmp_path):
    """``--out`` relative to the working directory, as a user types it: the serving process runs
    inside ``--out``, so the example must not hand it paths relative to the parent."""
    _require("export_savedmodel")
    stdout = run_example("export_savedmodel", "--out=export", "--units=4", "--length=8",
                         "--num_train=64", "--epochs=1", cwd=tmp_path)
    out = tmp_path / "export"
    assert (out / "saved_model" / "saved_model.pb").exists()
    assert (out / "outputs.npz").exists(), "the serving process wrote no outputs"
    assert "served vs Keras: max |difference|" in stdout
