"""report: one self-contained HTML report (and a Markdown twin) over every stage's outputs.

Figures are written as PNGs under `reports/figures/` and the same bytes are embedded in
`reports/report.html` as base64 data URIs, so the HTML is a single file that opens offline.
This module is the stage: `run` and the jinja2 environment of `liverseg/templates/`. Its
parts live in `liverseg.report`: `inputs` (the files earlier stages wrote, the only files
read), `table` (cells), `figures` (the PNGs) and `sections` (each section's context). None
of it imports torch, DVC, MLflow or Dagster, nor does `liverseg report`: params validation
knows the model names without torch (`liverseg.models.MODEL_NAMES`).
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from liverseg.artifacts import Artifacts
from liverseg.io import atomic_dir, write_text
from liverseg.report.inputs import load_inputs
from liverseg.report.sections import all_figures, build_context


def environment() -> Environment:
    # "html.j2" too: select_autoescape matches name suffixes, and ours end in .j2.
    return Environment(loader=PackageLoader("liverseg", "templates"),
                       autoescape=select_autoescape(["html", "html.j2"]),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       keep_trailing_newline=True)


def run(params, root: str | Path = ".") -> dict:
    art = Artifacts(root)
    inputs = load_inputs(list(params.models), art)
    context = build_context(params, art.raw, inputs)
    figures = all_figures(context)
    env = environment()
    html = env.get_template("report.html.j2").render(**context)
    markdown = env.get_template("report.md.j2").render(**context)

    # Everything is rendered before anything is written: a failure leaves the old report whole.
    with atomic_dir(art.figures) as tmp:
        for figure in figures:
            (tmp / figure.name).write_bytes(figure.png)
    html_path = write_text(art.report(".html"), html)
    md_path = write_text(art.report(".md"), markdown)
    return {"report": str(html_path), "markdown": str(md_path), "figures": len(figures),
            "models": context["models"], "best_model": context["comparison"]["best_model"],
            "html_bytes": len(html.encode())}
