"""Text-only facts for T-Locality: country capitals from the ``countryinfo`` package (offline).

Each fact is an NQ-style pair like MMEdit's ``loc``/``loc_ans``:
``("nq question: what is the capital of france?", "paris")``.

Which entries are kept (countryinfo's data has a few irregular ones):
- only current ISO 3166-1 entries (those with a numeric code; this drops withdrawn or duplicate
  entries such as "Antilles néerlandaises", "Burma" next to "Myanmar", or "Scotland");
- one entry per ISO code, and names without commas or brackets ("Virgin Islands, British",
  "Holy See (Vatican City State)" are dropped);
- a single capital ("Kralendijk / Oranjestad / The Bottom" is dropped; a one-item list is taken);
- countries with no capital (Antarctica, Bouvet Island, ...) are skipped.
"""

from __future__ import annotations

import importlib.metadata
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

QUESTION = "nq question: what is the capital of {}?"
SOURCE = "countryinfo"


def source_version() -> str:
    """``"countryinfo <version>"``: recorded in a built benchmark's manifest."""
    try:
        return f"{SOURCE} {importlib.metadata.version(SOURCE)}"
    except importlib.metadata.PackageNotFoundError:
        return SOURCE


def _capital_of(country: Any) -> tuple[str, str, str] | None:
    """(iso numeric code, name, capital) of a countryinfo entry, or None if it is irregular."""
    try:
        name, capital, iso = country.name(), country.capital(), country.iso()
    except Exception:  # noqa: BLE001  (countryinfo raises KeyError & co. for missing fields)
        return None
    if isinstance(capital, list):
        capital = capital[0] if len(capital) == 1 else None
    code = iso.get("numeric") if isinstance(iso, dict) else None
    if not (isinstance(name, str) and isinstance(capital, str) and code):
        return None
    name, capital = name.strip(), capital.strip()
    if not name or not capital or any(ch in name for ch in ",()") or "/" in capital:
        return None
    return code, name, capital


@lru_cache(maxsize=1)
def capital_questions() -> list[tuple[str, str]]:
    """NQ-style (question, answer) pairs, lower case, sorted (deterministic)."""
    try:
        from countryinfo import all_countries
    except ImportError as e:
        raise RuntimeError("text-locality facts need the package countryinfo: "
                           "pip install countryinfo") from e
    by_code: dict[str, tuple[str, str]] = {}
    for entry in all_countries():
        got = _capital_of(entry)
        if got is not None:
            code, name, capital = got
            by_code.setdefault(code, (QUESTION.format(name.lower()), capital.lower()))
    if not by_code:
        raise RuntimeError("countryinfo returned no capitals; reinstall the countryinfo package")
    log.debug("%d capital facts from %s", len(by_code), source_version())
    return sorted(by_code.values())
