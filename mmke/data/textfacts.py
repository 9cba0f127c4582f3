"""Text-only facts for T-Locality, from packaged country data (offline): ``countryinfo`` and
``pycountry``.

Each fact is an NQ-style pair like MMEdit's ``loc``/``loc_ans``, all lower case:
``("nq question: what is the capital of france?", "paris")``,
``("nq question: what is the currency of ethiopia?", "ethiopian birr")``.

- :func:`capital_questions`: the capitals only, one pool for every split (benchmark v1).
- :func:`country_facts`: seven kinds of question per country (:data:`KINDS`: capital, region,
  subregion, demonym, currency, main language, calling code), and :func:`fact_pools`, which splits
  the *countries* (by ISO code, seeded) into disjoint eval and train pools, so that no question
  about an eval-pool country occurs in a train file (benchmark v2).

Which entries are kept (countryinfo's data has a few irregular ones):
- only current ISO 3166-1 entries (those with a numeric code; this drops withdrawn or duplicate
  entries such as "Antilles néerlandaises", "Burma" next to "Myanmar", or "Scotland");
- one entry per ISO code, and names without commas or brackets ("Virgin Islands, British",
  "Holy See (Vatican City State)" are dropped);
- a single capital ("Kralendijk / Oranjestad / The Bottom" is dropped; a one-item list is taken);
  countries with no capital (Antarctica, Bouvet Island, ...) have no capital question;
- v2 kinds, each dropped for a country where it is irregular: an empty region or subregion; a
  demonym that is empty, lists several ("Antiguan,Barbudan") or repeats the name; several or
  unknown currencies (the name is pycountry's, e.g. "us dollar"); a main language (countryinfo's
  first) that pycountry does not know or names with brackets other than "(macrolanguage)";
  several calling codes or a non-numeric one (the answer is "+<digits>").
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

QUESTION = "nq question: what is the capital of {}?"
SOURCE = "countryinfo"
EVAL_FRACTION = 0.3  # share of countries whose questions are eval-only (v2)

#: v2 question kinds and their NQ-style templates ({} is the lower-case country name)
KINDS: dict[str, str] = {
    "capital": QUESTION,
    "region": "nq question: in which region of the world is {}?",
    "subregion": "nq question: in which subregion of the world is {}?",
    "demonym": "nq question: what is the demonym of {}?",
    "currency": "nq question: what is the currency of {}?",
    "language": "nq question: what is the main language of {}?",
    "calling_code": "nq question: what is the calling code of {}?",
}


def source_version() -> str:
    """``"countryinfo <version>"``: recorded in a built benchmark's manifest."""
    return f"{SOURCE} {_version(SOURCE)}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def source_versions() -> dict[str, str]:
    """Versions of the packages the v2 facts come from (for the manifest)."""
    return {"countryinfo": _version("countryinfo"), "pycountry": _version("pycountry")}


def _all_countries() -> list[Any]:
    try:
        from countryinfo import all_countries
    except ImportError as e:
        raise RuntimeError("text-locality facts need the package countryinfo: "
                           "pip install countryinfo") from e
    return list(all_countries())


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
    """NQ-style (question, answer) capital pairs, lower case, sorted (deterministic); v1's facts."""
    by_code: dict[str, tuple[str, str]] = {}
    for entry in _all_countries():
        got = _capital_of(entry)
        if got is not None:
            code, name, capital = got
            by_code.setdefault(code, (QUESTION.format(name.lower()), capital.lower()))
    if not by_code:
        raise RuntimeError("countryinfo returned no capitals; reinstall the countryinfo package")
    log.debug("%d capital facts from %s", len(by_code), source_version())
    return sorted(by_code.values())


# ---- v2: several kinds of fact per country ---------------------------------------------------
@dataclass(frozen=True, order=True)
class CountryFact:
    """One NQ-style fact about a country: its ISO numeric code, the kind, question and answer."""

    code: str
    kind: str
    question: str
    answer: str


def _call(entry: Any, method: str) -> Any:
    try:
        return getattr(entry, method)()
    except Exception:  # noqa: BLE001  (countryinfo raises KeyError & co. for missing fields)
        return None


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _single(values: Any) -> str | None:
    """The one item of a one-item list of non-empty strings, else None."""
    if isinstance(values, list) and len(values) == 1:
        return _text(values[0])
    return None


def _capital(entry: Any, name: str) -> str | None:
    got = _capital_of(entry)
    return got[2] if got is not None else None


def _demonym(entry: Any, name: str) -> str | None:
    d = _text(_call(entry, "demonym"))
    return d if d and "," not in d and d.lower() != name.lower() else None


def _currency(entry: Any, name: str) -> str | None:
    code = _single(_call(entry, "currencies"))
    cur = _pycountry().currencies.get(alpha_3=code) if code else None
    return _text(getattr(cur, "name", None))


def _language(entry: Any, name: str) -> str | None:
    codes = _call(entry, "languages")
    code = _text(codes[0]) if isinstance(codes, list) and codes else None
    lang = _pycountry().languages.get(alpha_2=code) if code else None
    lname = _text(getattr(lang, "name", None))
    if lname is None:
        return None
    lname = lname.removesuffix(" (macrolanguage)")
    return None if any(ch in lname for ch in ",;()") else lname


def _calling_code(entry: Any, name: str) -> str | None:
    code = _single(_call(entry, "calling_codes"))
    return f"+{code}" if code and code.isdigit() else None


_ANSWERS: dict[str, Callable[[Any, str], str | None]] = {
    "capital": _capital,
    "region": lambda e, n: _text(_call(e, "region")),
    "subregion": lambda e, n: _text(_call(e, "subregion")),
    "demonym": _demonym,
    "currency": _currency,
    "language": _language,
    "calling_code": _calling_code,
}


def _pycountry() -> Any:
    try:
        import pycountry
    except ImportError as e:
        raise RuntimeError("text-locality facts need the package pycountry: pip install pycountry") from e
    return pycountry


def _regular_countries() -> dict[str, tuple[str, Any]]:
    """ISO numeric code -> (name, countryinfo entry): the first entry per code whose name is
    regular (no commas or brackets); names that two codes share are dropped."""
    by_code: dict[str, tuple[str, Any]] = {}
    for entry in _all_countries():
        name, iso = _text(_call(entry, "name")), _call(entry, "iso")
        code = iso.get("numeric") if isinstance(iso, dict) else None
        if name and code and not any(ch in name for ch in ",()"):
            by_code.setdefault(code, (name, entry))
    names = [n.lower() for n, _ in by_code.values()]
    return {c: v for c, v in by_code.items() if names.count(v[0].lower()) == 1}


@lru_cache(maxsize=1)
def country_facts() -> tuple[CountryFact, ...]:
    """Every fact of every kind in :data:`KINDS`, lower case, sorted by (code, kind)."""
    out = []
    for code, (name, entry) in _regular_countries().items():
        for kind, template in KINDS.items():
            answer = _ANSWERS[kind](entry, name)
            if answer:
                out.append(CountryFact(code, kind, template.format(name.lower()), answer.lower()))
    if not out:
        raise RuntimeError("countryinfo returned no country facts; reinstall the countryinfo package")
    log.debug("%d country facts from %s", len(out), source_versions())
    return tuple(sorted(out))


@dataclass(frozen=True)
class FactPools:
    """Disjoint T-Locality pools: every question about an eval-pool country is eval-only."""

    eval_countries: tuple[str, ...]
    train_countries: tuple[str, ...]
    eval: tuple[tuple[str, str], ...]  # (question, answer), sorted
    train: tuple[tuple[str, str], ...]

    def summary(self) -> dict[str, Any]:
        """Countries, questions and questions per kind of each pool (for the manifest)."""
        facts = country_facts()

        def one(codes: tuple[str, ...], pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
            members = set(codes)
            kinds: dict[str, int] = {}
            for f in facts:
                if f.code in members:
                    kinds[f.kind] = kinds.get(f.kind, 0) + 1
            return {"countries": len(codes), "questions": len(pairs), "kinds": kinds}

        return {"eval": one(self.eval_countries, self.eval),
                "train": one(self.train_countries, self.train)}


@lru_cache(maxsize=8)
def fact_pools(seed: int = 0, eval_fraction: float = EVAL_FRACTION) -> FactPools:
    """Split the countries of :func:`country_facts` (by ISO code, shuffled with ``seed``) into an
    eval pool (``eval_fraction`` of them) and a train pool (the rest); deterministic."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction!r}")
    facts = country_facts()
    codes = sorted({f.code for f in facts})
    random.Random(f"fact-pools:{seed}").shuffle(codes)
    k = max(1, min(len(codes) - 1, round(eval_fraction * len(codes))))
    ev_codes, tr_codes = tuple(sorted(codes[:k])), tuple(sorted(codes[k:]))
    ev_set = set(ev_codes)
    ev_pairs = tuple(sorted((f.question, f.answer) for f in facts if f.code in ev_set))
    tr_pairs = tuple(sorted((f.question, f.answer) for f in facts if f.code not in ev_set))
    return FactPools(ev_codes, tr_codes, ev_pairs, tr_pairs)
