"""Launched reference runs, each made once per pytest run and shared by every test that compares against it.

A reference run is an uninterrupted launch of a stage (2 CPU ranks unless told) that tests compare a resumed, killed,
relaunched or otherwise varied run with. ``ReferenceRuns.get`` launches a command line the first time it is asked for
and hands the same output folder and summary to every later caller, whichever module asks: runs are keyed by their
script, arguments and rank count, and live in pytest's temporary folder, so nothing is reused across pytest runs.
The session's registry is conftest's ``reference_runs`` fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

Key = Tuple[str, Tuple[str, ...], int]


class ReferenceRuns:
    """The session's launched reference runs, by (script, arguments, ranks)."""

    def __init__(self, tmp_path_factory) -> None:
        self._factory = tmp_path_factory
        self._runs: Dict[Key, Tuple[Path, dict]] = {}

    def get(self, script: str, *args: str, ranks: int = 2) -> Tuple[Path, dict]:
        """(output folder, summary) of ``script ARGS --output FOLDER`` on ``ranks`` CPU ranks, launched on first use;
        the command must finish with exit 0. ``args`` hold everything but ``--output``."""
        from conftest import run_ranks, summary_from

        assert "--output" not in args, "a reference run's output folder is its own"
        key = (script, tuple(args), ranks)
        if key not in self._runs:
            out = self._factory.mktemp(f"reference-{Path(script).stem}")
            proc = run_ranks(script, *args, "--output", str(out), ranks=ranks)
            self._runs[key] = (out, summary_from(proc.stdout))
        return self._runs[key]
