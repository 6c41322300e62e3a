"""The install is declared, pinned and run as the README says: every imported package is a declared dependency,
the lock (constraints.txt) pins each of them within the declared bounds, and CI runs the README's commands."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _requirements() -> list[Requirement]:
    extras = [r for group in PROJECT["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*PROJECT["dependencies"], *extras]]


def _imported_top_level_names() -> set[str]:
    files = [*ROOT.glob("*.py"), *(ROOT / "diffsparse").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    names = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    own = {p.name for p in ROOT.iterdir() if p.is_dir()} | {p.stem for p in ROOT.glob("*.py")}
    own |= {p.stem for p in (ROOT / "tests").glob("*.py")}  # test helpers next to the tests (conftest, ...)
    return {n for n in names if n not in sys.stdlib_module_names and n not in own}


def test_every_imported_package_is_declared():
    declared = {_name(str(r)) for r in _requirements()}
    distributions = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level_names()):
        providers = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [module])}
        if not providers & declared:
            undeclared[module] = sorted(providers)
    assert not undeclared, f"imported but not declared in pyproject.toml (add them): {undeclared}"


def test_the_lock_pins_every_dependency_within_its_bounds():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not an exact pin (NAME==VERSION)"
            pins[_name(name)] = Version(version)
    for requirement in _requirements():
        name = _name(str(requirement))
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it: refresh the lock (README)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}"
        )


def test_internals_we_hook_into_have_a_tested_upper_bound():
    diffusers = next(r for r in _requirements() if _name(str(r)) == "diffusers")
    assert any(spec.operator in ("<", "<=", "==") for spec in diffusers.specifier), diffusers


def test_ci_runs_the_readme_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up\n\n(?:<!--[^\n]*-->\n)?```bash\n(.*?)```", readme, re.S)
    assert block, "README.md needs a '## Set-up' section opening with a bash block"
    commands = [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2 and commands[0].startswith("pip install") and "-c constraints.txt" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci and commands[1] in ci, (commands, ci)
    assert any(re.match(r'python3? -m venv "\$venv"', line) for line in ci), "CI must install into a new environment"
    assert ci.index(commands[0]) < ci.index(commands[1])
