"""Great Expectations' Data Docs of a validate run, as plain files that work offline:
the site GX writes (`add_site`), with CSS rules for the status icons its CDN would style,
plain links from the index to the result pages, and only the static files a page names."""

from __future__ import annotations

from html import escape
from pathlib import Path

DOCS_SITE = "liverseg"
# GX's pages take Bootstrap and Font Awesome from CDNs; without them the status column of the
# result table would be blank. These rules come before the CDN's, which win when online.
OFFLINE_CSS = """\
.fa-check-circle:empty::before { content: "\\2714"; }
.fa-times:empty::before { content: "\\2718"; }
.text-success { color: #28a745; }
.text-danger { color: #dc3545; }
"""


def data_docs_site(base_directory: str | Path) -> dict:
    """GX site config: Data Docs as plain files under `base_directory`."""
    # No how-to buttons: their walkthrough is GX onboarding, not part of this run's result.
    return {"class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(base_directory).resolve())}}


def add_site(context, site_dir: Path, plugins_dir: Path):
    """Register a Data Docs site writing to `site_dir`; return the action that builds it."""
    from great_expectations.checkpoint import UpdateDataDocsAction

    styles = plugins_dir / "custom_data_docs" / "styles"
    styles.mkdir(parents=True, exist_ok=True)
    (styles / "data_docs_custom_styles.css").write_text(OFFLINE_CSS)
    context.variables.plugins_directory = str(plugins_dir)  # GX inlines that CSS in each page
    context.add_data_docs_site(site_name=DOCS_SITE, site_config=data_docs_site(site_dir))
    return UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])


def drop_unreferenced_static(site: Path) -> None:
    """GX copies ~3.4 MB of onboarding images into every site; keep only files a page or
    stylesheet names (fonts, the logo), so each run's docs stay small."""
    pages = " ".join(p.read_text(encoding="utf-8", errors="replace")
                     for p in site.rglob("*") if p.suffix in {".html", ".css"})
    for path in (site / "static").rglob("*") if (site / "static").is_dir() else []:
        if path.is_file() and path.suffix not in {".html", ".css"} and path.name not in pages:
            path.unlink()


def link_runs_from_index(site: Path) -> None:
    """Add plain links to the result pages to GX's index.html.

    GX fills the index's run table with jQuery/bootstrap-table from CDNs, so offline it is
    empty; the result pages themselves are static HTML.
    """
    index = site / "index.html"
    pages = sorted(p.relative_to(site).as_posix() for p in site.glob("validations/**/*.html"))
    links = "".join(f'<li><a href="{escape(p)}">{escape(p)}</a></li>' for p in pages)
    block = f'<div class="container"><p>Validation results:</p><ul>{links}</ul></div>\n'
    html = index.read_text(encoding="utf-8")
    at = html.rfind("</body>")
    index.write_text(html[:at] + block + html[at:] if at >= 0 else html + block,
                     encoding="utf-8")
