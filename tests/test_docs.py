"""Every code block in README.md and docs/*.md runs, and every command in them is checked.

The convention, for whoever writes a page:

* A fenced block opened with ```` ```python ```` runs. All Python blocks of one page run in the
  order of the page in one fresh Python process, in one namespace (a later block may use what an
  earlier one defined), with ``PYTHONPATH`` at the repository root, ``MPLBACKEND=Agg`` and a new
  temporary working directory. Write them at small sizes: the whole page should run in seconds.
* A block that must not run is opened with ```` ```python no-run ```` (renderers read only the
  first word, so it still shows as Python). Use it only for what a test process cannot have (a
  GPU, several machines, the user's own data) and say so in the text around it.
* ```` ```text ```` blocks are output or diagrams; they are not run.
* ```` ```bash ```` blocks hold shell commands, one per line (``\\`` continues a line). Each
  command, split at ``&&``, must be one of the forms ``_check_command`` knows, each exercised
  elsewhere: the test command (identical to the one ``.ci/run`` runs), ``pip install`` of this
  package's extras (they must exist in setup.cfg), ``python -m ruff check .``, ``python -m pytest``
  as the test command runs it (optionally after ``NAME=value`` settings the package reads),
  ``python examples/<name>.py`` (each example runs at tiny flags in tests/test_examples.py; the
  flags used here must exist), ``python tests/test_docs.py DIR`` (the API reference, built below)
  and ``python benchmarks/<name>.py`` (each such script runs at tiny
  sizes in tests/test_benchmarks.py; the flags used here must exist). Commands quoted inline
  (```` `python examples/...` ````) are checked the same way.

The API reference (pdoc) is built here too, with every warning an error; run as a program,
``python tests/test_docs.py DIR`` writes it to ``DIR``.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path) -> list[tuple[str, int, str]]:
    """``[(info string, first line number of the code, code)]`` of every fenced block."""
    text = page.read_text(encoding="utf-8")
    return [(m.group(1).strip(), text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in FENCE.finditer(text)]


def python_blocks(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for info, line, code in blocks(page) if info == "python"]


# ------------------------------------------------------------------------------------------------
# Python blocks
# ------------------------------------------------------------------------------------------------
_RUNNER = textwrap.dedent("""
    import json, pathlib, re, sys, traceback
    page, blocks = json.load(open(sys.argv[1], encoding="utf-8"))
    sources = pathlib.Path(sys.argv[2])  # each block as a file: tracebacks and AutoGraph read it
    namespace = {"__name__": "__main__"}
    for line, code in blocks:
        path = sources / (re.sub(r"\\W", "_", page) + f"_line{line}.py")
        path.write_text(code, encoding="utf-8")
        try:
            exec(compile(code, str(path), "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: {page}, the block at line {line}", file=sys.stderr)
            sys.exit(1)
""")


def test_the_convention_is_followed():
    """Every fence says what it is, and a not-run block is marked exactly as documented."""
    for page in PAGES:
        for info, line, _ in blocks(page):
            assert info in ("python", "python no-run", "text", "bash"), (
                f"{_rel(page)}:{line}: fence info {info!r}; use python, python no-run, text, bash")


def test_no_run_blocks_are_few():
    """``no-run`` is the exception: at most one per page."""
    for page in PAGES:
        marked = [line for info, line, _ in blocks(page) if info == "python no-run"]
        assert len(marked) <= 1, f"{_rel(page)}: no-run blocks at lines {marked}"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=_rel)
def test_python_blocks_run(page, tmp_path):
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([_rel(page), python_blocks(page)]), encoding="utf-8")
    runner = tmp_path / "run_blocks.py"
    runner.write_text(_RUNNER, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
        "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(runner), str(spec), str(tmp_path)], cwd=work,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")


# ------------------------------------------------------------------------------------------------
# Shell commands
# ------------------------------------------------------------------------------------------------
def ci_command() -> str:
    """The one command line of ``.ci/run`` after its ``cd``."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(commands) == 1, f".ci/run should hold one command line, got {commands}"
    return commands[0]


def _extras() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return set(cfg["options.extras_require"])


def _defined_flags(script: Path) -> set[str]:
    """absl flags a script defines (``flags.DEFINE_<kind>("name", ...)``), read from its source,
    plus those of the modules next to it that it imports (``_cli``, ``_runners``...)."""
    sources = [script.read_text(encoding="utf-8")]
    for helper in re.findall(r"^(?:from|import) (_\w+)", sources[0], re.M):
        if (script.parent / f"{helper}.py").exists():
            sources.append((script.parent / f"{helper}.py").read_text(encoding="utf-8"))
    names = set()
    for source in sources:
        names |= set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", source))
    return names


def _benchmarks_run_by_tests() -> set[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    import test_benchmarks
    import test_gpu_check

    return set(test_benchmarks.TINY) | {test_gpu_check.SCRIPT.name}


def _examples_run_by_tests() -> set[str]:
    source = (Path(__file__).parent / "test_examples.py").read_text(encoding="utf-8")
    return set(re.findall(r"run_example\(\s*\"(\w+)\"", source))


def _package_variables() -> set[str]:
    names = set()
    for path in (ROOT / "keras_fancyrnn").rglob("*.py"):
        names |= set(re.findall(r"KERAS_FANCYRNN_\w+", path.read_text(encoding="utf-8")))
    return names


def _pytest_part(command: str) -> str:
    """The test command's first pytest run (the TensorFlow backend's, the whole suite)."""
    return next(p.strip() for p in command.split("&&") if "pytest" in p)


def _check_script(kind: str, words: list[str], where: str) -> None:
    script = ROOT / words[1]
    assert script.exists(), f"{where}: {words[1]} does not exist"
    run = _examples_run_by_tests() if kind == "examples" else _benchmarks_run_by_tests()
    assert (script.stem if kind == "examples" else script.name) in run, (
        f"{where}: no test runs {words[1]}")
    defined = _defined_flags(script) | {"help", "helpfull"}
    for word in words[2:]:
        flag = re.match(r"--(\w+)", word)
        if flag:
            name = flag.group(1)
            assert name in defined or (name[:2] == "no" and name[2:] in defined), (
                f"{where}: {words[1]} has no flag --{name}")


def _check_command(command: str, where: str) -> None:
    """Fails unless ``command`` (one line) is a form this module knows to be exercised."""
    if command == ci_command():
        return
    for part in (p.strip() for p in command.split("&&")):
        words = shlex.split(part)
        settings = []
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            settings.append(words.pop(0).split("=")[0])
        unknown = set(settings) - _package_variables() - {"TF_CPP_MIN_LOG_LEVEL"}
        assert not unknown, f"{where}: {sorted(unknown)} are not read by keras_fancyrnn"
        line = " ".join(words)
        if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
            for spec in (w for w in words if w.startswith(".[")):
                extras = set(spec[2:-1].split(","))
                assert extras <= _extras(), f"{where}: no extra {extras - _extras()} in setup.cfg"
        elif line == "python -m ruff check ." or (
                words[:2] == ["python", "tests/test_docs.py"] and len(words) == 3):
            pass  # ruff: the test command; test_docs.py DIR: test_api_reference_builds...
        elif words[:3] == ["python", "-m", "pytest"]:
            assert line == _pytest_part(ci_command()), (
                f"{where}: {line!r} is not the test command's {_pytest_part(ci_command())!r}")
        elif words[:1] == ["python"] and len(words) > 1 and words[1].startswith("examples/"):
            _check_script("examples", words, where)
        elif words[:1] == ["python"] and len(words) > 1 and words[1].startswith("benchmarks/"):
            _check_script("benchmarks", words, where)
        else:
            pytest.fail(f"{where}: no test exercises {part!r}; add a check to tests/test_docs.py")


def shell_commands(page: Path) -> list[tuple[str, str]]:
    """``[(command, where)]``: lines of bash blocks, and ``python examples|benchmarks/...``
    quoted inline anywhere on the page."""
    out = []
    for info, line, code in blocks(page):
        if info == "bash":
            for i, command in enumerate(code.replace("\\\n", " ").splitlines()):
                if command.strip() and not command.lstrip().startswith("#"):
                    out.append((" ".join(command.split()), f"{_rel(page)}:{line + i}"))
    prose = FENCE.sub("", page.read_text(encoding="utf-8"))
    for m in re.finditer(r"`((?:[A-Z_]+=\S+ )*python (?:examples|benchmarks)/[^`]*)`", prose):
        out.append((" ".join(m.group(1).split()), f"{_rel(page)} (inline)"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_shell_commands_are_exercised(page):
    for command, where in shell_commands(page):
        _check_command(command, where)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bash = [code.strip() for info, _, code in blocks(ROOT / "README.md") if info == "bash"]
    assert ci_command() in bash, ".ci/run's command is not a block of its own in the README"
    assert "the README's test command" in (ROOT / ".ci" / "run").read_text()
    assert readme.count(ci_command()) == 1


def test_the_main_job_command_is_in_the_readme():
    commands = [c for c, _ in shell_commands(ROOT / "README.md")]
    assert any("python examples/vanishing_gradients.py" in c for c in commands)


def test_links_to_files_exist():
    """Relative links in the pages point at files of the repository."""
    for page in [*PAGES, *(ROOT / "benchmarks" / "results").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not re.match(r"\w+://", target):
                assert (page.parent / target).exists(), f"{_rel(page)}: broken link {target}"


# ------------------------------------------------------------------------------------------------
# The API reference
# ------------------------------------------------------------------------------------------------
# The one warning allowed: tensorflow_datasets annotates BuilderConfig.version as
# ``utils.VersionOrStr``, a name pdoc cannot resolve in any module (TFDS's own pages warn alike);
# LengthConfig inherits those fields. Every other warning fails the build.
THIRD_PARTY = r"^Error parsing type annotation (list\[)?utils\.VersionOrStr\]?( \| None)? for "


def build_api_reference(out_dir: Path) -> list[str]:
    """Renders every public module of keras_fancyrnn to HTML under ``out_dir`` with pdoc and
    returns the warnings it gave (the allowed third-party one left out)."""
    import importlib
    import pkgutil
    import warnings

    import pdoc
    import pdoc.extract
    import pdoc.render

    import keras_fancyrnn

    # every public module, imported first: warnings of TensorFlow's own imports are not ours
    modules = [info.name for info in pkgutil.walk_packages(keras_fancyrnn.__path__,
                                                           "keras_fancyrnn.")
               if not any(part.startswith("_") for part in info.name.split("."))]
    for name in modules:
        importlib.import_module(name)
    specs = ["keras_fancyrnn"]  # a spec brings its submodules, except those __all__ hides
    for name in modules:
        if name not in pdoc.extract.walk_specs(specs):
            specs.append(name)
    pdoc.render.configure(docformat="restructuredtext", math=True)  # the docstrings use :math:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*specs, output_directory=Path(out_dir))
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if not re.search(THIRD_PARTY, str(w.message))]


def test_api_reference_builds_without_warnings(tmp_path):
    """``python tests/test_docs.py <dir>`` (the README's command) builds the reference; any
    warning (a docstring or annotation pdoc cannot read) fails. A subprocess, so that the package
    documented is this checkout's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "api")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "api" / "keras_fancyrnn.html").exists()
    assert (tmp_path / "api" / "keras_fancyrnn" / "diagnostics" / "monitor.html").exists()


if __name__ == "__main__":  # python tests/test_docs.py OUT_DIR: the API reference into OUT_DIR
    os.environ.setdefault("PDOC_ALLOW_EXEC", "1")  # TensorFlow's import runs `uname -p`
    sys.path.insert(0, str(ROOT))
    problems = build_api_reference(Path(sys.argv[1]))
    print("\n".join(problems) or f"API reference written to {sys.argv[1]}/index.html",
          file=sys.stderr if problems else sys.stdout)
    sys.exit(1 if problems else 0)
