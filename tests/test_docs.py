"""The docs cannot rot: every fenced block marked runnable in the site's pages runs here.

A block is runnable when the line just before its opening fence is `<!-- runnable -->` (an HTML
comment: MkDocs renders the block as usual and shows nothing for the marker). `bash` blocks run with
`bash -e -o pipefail` in one workspace shared by all pages, in the site's navigation order, so a page
can use what an earlier page made (the PT page's model is the SFT page's start), as a reader going
through the site would. The workspace holds a link to the repository's `examples/` and nothing else;
the venv running the tests is first on PATH. `yaml` blocks are read through lmforge's own loaders: a
file with `stages:` as a pipeline, one with `stage:` as a stage config, anything else as an
evaluation suite.

A block whose commands (comment lines and trailing comments aside) were already run in this workspace
is not run again: the Chinese pages give the English pages' commands with Chinese comments.

The demo pipeline (the quick start's and the walkthrough's `lmforge run examples/demo.yaml`, and the
commands that read its folder) is not marked: tests/test_demo_pipeline.py runs it on a shorter
schedule, and a second run here would double the suite's heaviest test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w-]*)")
BLOCK_TIMEOUT_S = 900  # generous: a CI machine may be shared; the blocks take seconds to a minute alone
STAGE_PAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo", "grpo", "rloo")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_blocks(path: Path) -> list[Block]:
    """The blocks of one Markdown file whose opening fence follows the runnable marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang = opening.group(1), opening.group(2)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: code block never closed")
        if i > 0 and lines[i - 1].strip() == MARKER:
            if lang not in ("bash", "yaml"):
                raise ValueError(f"{path}:{i + 1}: runnable blocks must be bash or yaml, not {lang or 'unmarked'}")
            blocks.append(Block(path, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def _nav_files(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    return []


def pages_in_nav_order() -> list[Path]:
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    # A page named in the nav but missing is the strict site build's failure to report, not this file's.
    return [DOCS / name for name in _nav_files(nav) if (DOCS / name).is_file()]


def commands_of(text: str) -> str:
    """A bash block without its comments, to tell whether two blocks run the same commands."""
    kept = []
    for line in text.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).rstrip()
        if line and not line.lstrip().startswith("#"):
            kept.append(line)
    return "\n".join(kept)


def load_yaml_block(config_file: Path) -> None:
    """Through the loader lmforge uses for such a file: a pipeline (`stages:`), a stage config
    (`stage:`), or else the keys of an evaluation suite (`lmforge eval --suite`)."""
    from lmforge.config.load import from_dict, load_config, read_yaml
    from lmforge.eval.spec import EvalSpec
    from lmforge.pipeline.run import load_pipeline

    raw = read_yaml(config_file)
    if "stages" in raw:
        load_pipeline(config_file, [])
    elif "stage" in raw:
        load_config(config_file)
    else:
        from_dict(EvalSpec, raw, where=str(config_file))


def run_block(block: Block, workspace: Path) -> None:
    """Run or load one block; an AssertionError naming the page and line when it breaks."""
    if block.lang == "yaml":
        config_file = workspace / f"docs-block-{block.path.stem}-{block.line}.yaml"
        config_file.write_text(block.text, encoding="utf-8")
        try:
            load_yaml_block(config_file)
        except Exception as exc:  # any failure to load is the block's fault: report it with its place
            raise AssertionError(f"{block.where}: this YAML does not load: {exc}") from exc
        return
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=workspace, env=env,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{block.where}: still running after {BLOCK_TIMEOUT_S} s:\n{block.text}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:]
        raise AssertionError(f"{block.where}: exit status {done.returncode}\n{block.text}\n--- output ---\n{output}")


ALL_BLOCKS = [block for page in pages_in_nav_order() for block in runnable_blocks(page)]


@pytest.fixture(scope="session")
def docs_workspace(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("docs-workspace")
    (workspace / "examples").symlink_to(ROOT / "examples")
    return {"path": workspace, "ran": set()}


@pytest.mark.slow
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.where for b in ALL_BLOCKS])
def test_runnable_block(block, docs_workspace):
    if block.lang == "bash":
        commands = commands_of(block.text)
        if commands in docs_workspace["ran"]:
            return  # the same commands already ran in this workspace (an English page's twin)
        run_block(block, docs_workspace["path"])
        docs_workspace["ran"].add(commands)
    else:
        run_block(block, docs_workspace["path"])


def test_every_stage_page_has_a_runnable_command_in_both_languages():
    for folder in (DOCS, DOCS / "zh"):
        for name in STAGE_PAGES:
            langs = [b.lang for b in runnable_blocks(folder / f"{name}.md")]
            assert "bash" in langs, f"{folder / name}.md has no runnable bash block"


def test_a_broken_block_fails_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n<!-- runnable -->\n```bash\ntrue\nfalse\necho never\n```\n\n"
                    "```bash\nexit 1\n```\n\n<!-- runnable -->\n```yaml\nstage: sft\ntrain: {lr: fast}\n```\n")
    blocks = runnable_blocks(page)
    assert [(b.line, b.lang) for b in blocks] == [(4, "bash"), (15, "yaml")]  # the unmarked block is left out
    with pytest.raises(AssertionError, match=r"page.md:4: exit status 1"):
        run_block(_rooted(blocks[0]), tmp_path)
    with pytest.raises(AssertionError, match=r"page.md:15: this YAML does not load"):
        run_block(_rooted(blocks[1]), tmp_path)


def _rooted(block: Block) -> Block:
    """`where` names paths relative to the repository; a test page lives elsewhere."""
    return Block(ROOT / "tests" / block.path.name, block.line, block.lang, block.text)


def test_a_marker_on_another_language_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- runnable -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match=r"page.md:2: runnable blocks must be bash or yaml"):
        runnable_blocks(page)
