#!/usr/bin/env python
"""Which statements two coverage runs (``make coverage``'s coverage.json) disagree on, robust to code that moved
between files: a statement is its stripped source text, counted per file set; what was covered before and exists
after but is covered nowhere after is listed (``lost``), with the totals. Exit 1 when any is lost.

    python tools/coverage_compare.py BEFORE.json AFTER.json [--before-root DIR] [--after-root DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Counter, Dict, List, Tuple


def statements(report: str, root: str) -> Tuple[Counter[str], Counter[str], Dict[str, List[str]]]:
    """(covered, all) statement texts of a coverage.json whose files are read under ``root``, and where each
    covered text was."""
    with open(report) as f:
        files = json.load(f)["files"]
    covered: Counter[str] = collections.Counter()
    every: Counter[str] = collections.Counter()
    where: Dict[str, List[str]] = collections.defaultdict(list)
    for name, data in files.items():
        path = name if os.path.isabs(name) else os.path.join(root, name)
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
        for number in data["executed_lines"] + data["missing_lines"]:
            text = lines[number - 1].strip() if number <= len(lines) else ""
            every[text] += 1
            if number in data["executed_lines"]:
                covered[text] += 1
                where[text].append(f"{os.path.relpath(path, root)}:{number}")
    return covered, every, where


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--before-root", default=".")
    parser.add_argument("--after-root", default=".")
    args = parser.parse_args()
    covered_before, _, where = statements(args.before, args.before_root)
    covered_after, every_after, _ = statements(args.after, args.after_root)
    lost = sorted(t for t in covered_before if t and every_after[t] and not covered_after[t])
    summary = {
        "before": {"covered": sum(covered_before.values())},
        "after": {"covered": sum(covered_after.values()), "statements": sum(every_after.values())},
        "lost": [{"statement": t, "was_covered_at": where[t][:3]} for t in lost],
    }
    print(json.dumps(summary, indent=1))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
