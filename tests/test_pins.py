"""constraints.txt is the tested set scripts/setup.sh installs: every dependency lmforge declares must be
pinned there, or a fresh install takes whatever version the index serves that day."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_except_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for r in project["optional-dependencies"]["dev"]}
    declared |= {_name(r) for r in project["optional-dependencies"]["smollm2"]}
    pins = pinned()
    assert "torch" not in pins  # setup.sh pins torch itself so a CUDA build can be chosen
    assert sorted(declared - {"torch"} - set(pins)) == []


def test_setup_installs_with_the_constraints_and_update_pins_rewrites_them():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'PINS=${PINS:-constraints.txt}' in setup and '-c "$PINS"' in setup
    update = (ROOT / "scripts" / "update-pins.sh").read_text()
    # the suite runs on the newest versions before constraints.txt is replaced, never after
    assert update.index("-m pytest") < update.index("> constraints.txt.new") < update.index("mv constraints.txt.new")
