"""Draw the docs' figures from a finished demo run, with the report's own plotting code, so the pages
show the curves a reader's `lmforge run examples/demo.yaml` will draw.

    python docs/tools/demo_figures.py RUN_DIR                  # a pipeline run: docs/images/demo-*.png
    python docs/tools/demo_figures.py --stage NAME KIND DIR    # one `lmforge train` output folder

Also prints the evaluation table and the first sample answers of every stage, which the walkthrough
quotes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.report import plots
from lmforge.report.html import eval_columns, load_run, read_jsonl

IMAGES = Path(__file__).resolve().parent.parent / "images"
DPI = 80  # small PNGs: the docs live in git
# KTO logs no pair accuracy or margin: show each side's implicit reward and the KL reference point.
plots.CURVE_KEYS.setdefault("kto", ("loss", "eval_loss", "rewards/chosen", "eval_rewards/chosen", "rewards/rejected",
                                    "eval_rewards/rejected", "kl", "lr"))


def save(fig, name: str) -> None:
    path = IMAGES / name
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main(run_dir: str) -> None:
    run = load_run(run_dir)
    IMAGES.mkdir(exist_ok=True)
    save(plots.pipeline_graph(run["stages"]), "demo-pipeline.png")
    for stage in run["stages"]:
        fig = plots.stage_curves(stage["name"], stage.get("stage", ""), stage["rows"])
        if fig is not None:
            save(fig, f"demo-{stage['name']}-curves.png")
    for label, metrics in eval_columns(run):
        print(label, json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    for stage in run["stages"]:
        samples = ((stage.get("manifest") or {}).get("eval") or {}).get("samples") or []
        for sample in samples:
            print(stage["name"], json.dumps(sample, ensure_ascii=False))


def one_stage(name: str, kind: str, folder: str) -> None:
    rows = read_jsonl(Path(folder) / "metrics.jsonl")
    save(plots.stage_curves(name, kind, rows), f"demo-{name}-curves.png")
    final = json.loads((Path(folder) / "lmforge.json").read_text(encoding="utf-8"))["metrics"]
    print(json.dumps({k: round(v, 4) for k, v in final.items() if isinstance(v, float)}))


if __name__ == "__main__":
    if sys.argv[1] == "--stage":
        one_stage(*sys.argv[2:5])
    else:
        main(sys.argv[1])
