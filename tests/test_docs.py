"""The README and the docs as a user reads them: every example runs as written, every recorded command (the ones
that produced the numbers) still parses, and the site builds with `mkdocs build --strict`.

Conventions of the pages: a ```python or ```bash block is an example, run here from the repository root (so it
must be quick: tiny models, `--quick`); a ```text block records a long command and its output, and each of its
`python ...` command lines is parsed here, not run; a block right after `<!-- not run: REASON -->` is left out
(only the set-up commands, which CI itself runs: tests/test_install.py checks them); a block right after
`<!-- slow: REASON -->` runs with the slow tests only (`python -m pytest -m slow`), to keep the default suite short.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```", re.S | re.M)  # also indented in a list
NOT_RUN = re.compile(r"<!-- not run: ([^>]+?) -->\s*$")
SLOW = re.compile(r"<!-- slow: ([^>]+?) -->\s*$")


def fenced_blocks() -> list[tuple[str, str, str, str | None, bool]]:
    """(page:line, language, code, the not-run reason or None, whether it is marked slow) of every fenced block of
    the pages."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            reason = NOT_RUN.search(before)
            line = text.count("\n", 0, m.start()) + 1
            code = textwrap.dedent(m.group(3))
            where = f"{page.relative_to(ROOT)}:{line}"
            found.append((where, m.group(2), code, reason and reason.group(1), bool(SLOW.search(before))))
    return found


BLOCKS = fenced_blocks()
EXAMPLES = [b for b in BLOCKS if b[1] in ("python", "bash") and b[3] is None]


def test_only_the_set_up_commands_are_left_out():
    left_out = [(where, reason) for where, _, _, reason, _ in BLOCKS if reason]
    assert [where.split(":")[0] for where, _ in left_out] == ["README.md"], left_out


def test_every_slow_marker_is_on_an_example_and_most_examples_run_by_default():
    markers = sum(len(re.findall(r"^<!-- slow: ", page.read_text(), re.M)) for page in PAGES)
    slow = [b for b in EXAMPLES if b[4]]
    assert markers == len(slow), "a <!-- slow: --> marker is not right before a python or bash block"
    assert len(slow) <= len(EXAMPLES) // 3, [b[0] for b in slow]


@pytest.mark.parametrize(
    "where,language,code",
    [pytest.param(*b[:3], id=b[0], marks=[pytest.mark.slow] if b[4] else []) for b in EXAMPLES],
)
def test_every_example_runs_as_written(where, language, code):
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    env_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # `python` is this environment's
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"PATH": env_path, "HOME": str(Path.home()), "WANDB_MODE": "offline"})  # fmt: skip
    assert run.returncode == 0, f"{where} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


def recorded_commands() -> list[tuple[str, str]]:
    """(page:line, command) of each `python ...` line of the text blocks (joined over trailing backslashes)."""
    commands = []
    for where, language, code, _, _ in BLOCKS:
        if language != "text":
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = line.strip().split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=2 python ...
                words = words[1:]
            if words and words[0] in ("python", "python3"):
                commands.append((where, " ".join(words)))
    return commands


def compose_train(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])


def on_this_machine(words: list[str]) -> list[str]:
    """A recorded GPU run's arguments with `--device cuda...` read as `cpu` where this machine has no CUDA device:
    every other flag is still checked."""
    import torch

    if "--device" not in words or torch.cuda.is_available():
        return words
    at = words.index("--device") + 1
    return [*words[:at], "cpu" if words[at].startswith("cuda") else words[at], *words[at + 1 :]]


def check_command(command: str) -> None:
    """Parse a recorded command as its program would, without running it; raise if it would not start."""
    from diffsparse.evaluate.bench_cli import parse_args as bench_args
    from diffsparse.evaluate.cli import parse_args as evaluate_args

    words = shlex.split(command)[1:]
    if words[:2] == ["-m", "diffsparse.evaluate"]:
        evaluate_args(words[2:])
    elif words[:2] == ["-m", "diffsparse.bench"]:
        bench_args(on_this_machine(words[2:]))
    elif words[0] == "-m":
        assert importlib.util.find_spec(words[1]) is not None, f"no module {words[1]}"
    elif words[0] in ("train.py", "infer.py"):
        name = "infer" if words[0] == "infer.py" else "train"
        if words[1:2] == ["--config-name"]:
            name, words = words[2], words[2:]
        compose_train(name, words[1:])
    else:
        assert (ROOT / words[0]).is_file(), f"no script {words[0]}"


RECORDS = recorded_commands()


@pytest.mark.parametrize("where,command", RECORDS, ids=[f"{w}:{c[:60]}" for w, c in RECORDS])
def test_every_recorded_command_still_parses(where, command):
    try:
        check_command(command)
    except SystemExit as e:  # argparse's usage error
        pytest.fail(f"{where}: `{command}` would not start (exit {e.code})")


def test_the_site_builds_strictly(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
