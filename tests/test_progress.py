"""Progress reports: every stage of a run, SeqLip's segments and the lower-bound search's restarts included, with
totals that end done; the numbers do not depend on whether anyone listens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lipgraph
from lipgraph.cli import main

MODELS = Path(__file__).parent / "models"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def _calls(**kw):  # type: ignore[no-untyped-def]
    calls: list[tuple[str, int, int]] = []
    r = lipgraph.analyze(_mlp(), torch.randn(1, 6), progress=lambda s, d, t: calls.append((s, d, t)), **kw)
    return r, calls


def test_every_stage_reports_and_ends_done() -> None:
    r, calls = _calls(lower_budget=3)
    stages = list(dict.fromkeys(s for s, _, _ in calls))
    assert stages[:2] == ["trace", "constants"], stages
    assert any(s.endswith("(seqlip)") for s in stages) and "lower bound" in stages, stages
    for stage in stages:  # the last call of each stage says it is done
        last = [c for c in calls if c[0] == stage][-1]
        assert last[1] >= last[2], (stage, last)
    # SeqLip's segments and the search's restarts are counted, not a single 0-of-1 / 1-of-1 pair
    seg_totals = {t for s, _, t in calls if s.endswith("(seqlip)")}
    assert r.segments and len(r.segments) in seg_totals, (seg_totals, len(r.segments))
    restarts = [(d, t) for s, d, t in calls if s == "lower bound" and t == 3]
    assert [d for d, _ in restarts] == [0, 1, 2, 3], restarts


def test_progress_does_not_change_the_numbers() -> None:
    r, _ = _calls(lower_budget=2)
    quiet = lipgraph.analyze(_mlp(), torch.randn(1, 6), lower_budget=2)
    assert (r.upper, r.lower) == (quiet.upper, quiet.lower)


def test_cli_progress_bars_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["analyze", f"{MODELS / 'small.py'}:Small", "--input-shape", "1,3,8,8", "--lower-budget", "2",
               "--progress", "--rows", "0"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    for stage in ("trace", "constants", "lower bound"):
        assert stage in cap.err, cap.err
    assert "Lipschitz constant" in cap.out and "lower bound" not in cap.out.split("Lipschitz")[0]


def test_cli_opens_one_bar_per_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage whose algorithm counts its own parts (SeqLip's segments: 0 of 1, then k of n, then 1 of 1) gets one
    bar, not a second one opened and closed by its final 1 of 1; a stage that comes back later gets a new one."""
    import tqdm

    from lipgraph.cli import _Progress

    opened: list[str] = []

    class Bar:
        def __init__(self, *a, desc: str = "", total: int = 1, **k) -> None:  # type: ignore[no-untyped-def]
            opened.append(desc)
            self.total, self.n = total, 0

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    p = _Progress(True)
    for done, total in ((0, 1), (0, 3), (1, 3), (2, 3), (3, 3), (1, 1)):
        p("bounds 2/5 (seqlip)", done, total)
    p("lower bound", 0, 1)
    p("lower bound", 1, 1)
    p("bounds 2/5 (seqlip)", 0, 1)
    assert opened == ["bounds 2/5 (seqlip)", "lower bound", "bounds 2/5 (seqlip)"], opened


def test_domain_search_counts_its_restarts() -> None:
    from lipgraph.domains import Ball

    calls: list[tuple[str, int, int]] = []
    lipgraph.analyze(_mlp(), torch.randn(1, 6), domain=Ball(torch.zeros(1, 6), 0.1), lower_budget=3,
                     progress=lambda s, d, t: calls.append((s, d, t)))
    lower = [(d, t) for s, d, t in calls if s == "lower bound" and t > 1]
    assert lower and lower[-1][0] == lower[-1][1] and lower[-1][1] >= 3, lower
    assert "domain" in {s for s, _, _ in calls}
