"""The Pipeline tab's Save, which is the one way a visitor writes a file of their choosing. It writes only
a pipeline that lmforge's own loader accepts and that passes the web UI's run checks (confine.py), under a
`.yaml`/`.yml` name under --root, in an existing folder that is neither hidden nor a model's or a run's
folder. An existing file is replaced only when it is itself a pipeline (the user's own, or one saved here
before); anything else of that name (a model's config, data, another tool's YAML) is left alone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmforge.config.errors import ConfigError
from lmforge.webui.confine import (
    LMFORGE_MARKS,
    MAX_CONFIG_BYTES,
    MODEL_FILES,
    Rules,
    check_pipeline_text,
    inside,
)

SUFFIXES = (".yaml", ".yml")
RESERVED = {"config.yaml", "webui-config.yaml"}
"""Names lmforge writes into run folders: a stage's recorded config, the web UI's run config."""


def save_pipeline(name: str, text: str, rules: Rules) -> Path:
    """Write `text` to `name` under the root if the rules above allow it; the path written, relative."""
    target = save_target(name, rules)
    relative = target.relative_to(rules.root)
    check_pipeline_text(text, rules, str(relative))
    descriptor, scratch = tempfile.mkstemp(dir=target.parent, prefix=".webui-save-", suffix=".tmp")
    try:  # written whole, then renamed over the old file: a reader never sees half a pipeline
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(scratch, 0o644)
        os.replace(scratch, target)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    return relative


def save_target(name, rules: Rules) -> Path:
    """Where Save may write for the typed name, or a ConfigError saying why not."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("Save: type a file name such as pipelines/mine.yaml")
    target = inside(name, rules, "Save")
    relative = target.relative_to(rules.root)
    if target.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"Save: {relative} is not a .yaml file; the web UI saves pipelines as NAME.yaml")
    if any(part.startswith(".") for part in relative.parts):
        raise ConfigError(f"Save: {relative} is in a hidden folder or is a hidden file; choose a visible name")
    if target.name in RESERVED:
        raise ConfigError(f"Save: {target.name} is a name lmforge writes into run folders; choose another name")
    if not target.parent.is_dir():
        raise ConfigError(f"Save: no folder {relative.parent} under the served folder; create it first")
    for folder in (target.parent, *target.parent.parents):
        if folder == rules.root:
            break
        if _holds(folder, MODEL_FILES) or _holds(folder, LMFORGE_MARKS):
            raise ConfigError(f"Save: {folder.relative_to(rules.root)} is a model's or a run's folder; "
                              "save pipelines elsewhere (e.g. pipelines/NAME.yaml)")
    if target.exists() and not _is_pipeline(target):
        raise ConfigError(f"Save: {relative} exists and is not a pipeline; the web UI replaces only pipelines: "
                          "choose a new name")
    return target


def _holds(folder: Path, patterns: tuple[str, ...]) -> bool:
    return any(next(folder.glob(pattern), None) is not None for pattern in patterns)


def _is_pipeline(path: Path) -> bool:
    """Whether an existing file is a pipeline lmforge's loader accepts (wherever its paths point)."""
    from lmforge.pipeline.run import load_pipeline
    from lmforge.webui.forms import from_yaml

    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_CONFIG_BYTES:
            return False
        from_yaml(path.read_text(encoding="utf-8"))  # bounded and alias-free before the loader expands it
        load_pipeline(path)
    except (ConfigError, OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError):
        return False
    return True
