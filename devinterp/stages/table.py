"""The plain-text stage table that ``devinterp stages`` and ``devinterp run`` print."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(stages: list[dict]) -> str:
    """A plain-text stage table; "end range" is where the milestone could equally be (5%-95%)."""
    rows = [f"{'stage':>5} {'type':>4} {'start':>9} {'end':>9} {'end range':>21} "
            f"{'llc change':>11} {'loss change':>11}"]
    for s in stages:
        rng = f"{s['end_step_low']:,}-{s['end_step_high']:,}"
        dloss = "" if s.get("loss_change") is None else f"{s['loss_change']:+.4g}"
        rows.append(f"{s['stage']:>5} {s['type']:>4} {s['start_step']:>9,} {s['end_step']:>9,} "
                    f"{rng:>21} {s['llc_change']:>+11.4g} {dloss:>11}")
    return "\n".join(rows)
