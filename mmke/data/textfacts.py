"""Text-only facts for T-Locality: country capitals from the ``countryinfo`` package (offline)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def capital_questions() -> list[tuple[str, str]]:
    """NQ-style (question, answer) pairs, sorted by country name for determinism."""
    from countryinfo import all_countries

    out = []
    for c in all_countries():
        try:
            name, capital = c.name(), c.capital()
        except Exception:  # some entries lack fields  # noqa: BLE001
            continue
        if isinstance(capital, list):  # a few countries list several capitals: take the first
            capital = capital[0] if capital else None
        if isinstance(name, str) and isinstance(capital, str) and name and capital:
            out.append((f"nq question: what is the capital of {name.lower()}?", capital.lower()))
    if not out:
        raise RuntimeError("countryinfo returned no capitals; reinstall the countryinfo package")
    return sorted(set(out))
