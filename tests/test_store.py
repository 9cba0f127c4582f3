"""The per-case store survives interrupted writes."""

import json

from mmke.eval.store import CaseStore


def test_partial_last_line_is_dropped_and_cases_not_duplicated(tmp_path):
    f = tmp_path / "cases.jsonl"
    s = CaseStore(f)
    s.add({"key": "a", "index": 0, "v": 1})
    s.add({"key": "b", "index": 1, "v": 2})
    with open(f, "ab") as fh:  # a write cut off by SIGKILL
        fh.write(b'{"key": "c", "ind')
    s2 = CaseStore(f)
    assert sorted(s2.done) == ["a", "b"]
    s2.add({"key": "c", "index": 2, "v": 3})
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert [r["index"] for r in CaseStore(f).rows()] == [0, 1, 2]
