"""One browser session's state: its preview runs, its picks, and the time it spent.

The running line is the paper's interaction-time argument for this user: the compute this
session spent (previews of every seed it looked at + finals of the seeds it picked) against
refining every previewed seed instead (all N finals; estimated from the finals this session
measured, N x time per final), in seconds and in model evaluations (NFE, exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from consolver.app.service import PreviewRun, RefineResult
from consolver.preview.core import LEARNED
from consolver.preview.sheet import shorten


@dataclass
class Session:
    """Per-session state (server side: the page never sees it). ``runs``: this session's preview
    runs, newest last; ``picks``: the refined seeds, oldest first."""

    runs: List[PreviewRun] = field(default_factory=list)
    picks: List[RefineResult] = field(default_factory=list)

    @property
    def current(self) -> Optional[PreviewRun]:
        return self.runs[-1] if self.runs else None

    def run(self, run_id: str) -> Optional[PreviewRun]:
        return next((r for r in self.runs if r.run_id == run_id), None)

    # ------------------------------------------------------------ the numbers

    def totals(self) -> dict:
        """Seconds and NFE of this session's previews (learned solver only: the compared rows are
        for comparison, not the workflow) and picks, and of refining every previewed seed instead.
        ``refine_all_s`` is ``None`` until a final has been measured."""
        previews = sum(len(r) for r in self.runs)
        preview_s = sum(r.seconds[LEARNED] for r in self.runs)
        compare_s = sum(s for r in self.runs for name, s in r.seconds.items() if name != LEARNED)
        final_s = sum(p.seconds for p in self.picks)
        steps = self.picks[-1].final_steps if self.picks else None
        per_final = final_s / len(self.picks) if self.picks else None
        out = {"runs": len(self.runs), "previews": previews, "preview_s": preview_s, "compare_s": compare_s,
               "finals": len(self.picks), "final_s": final_s, "session_s": preview_s + final_s,
               "seconds_per_final": per_final, "refine_all_s": previews * per_final if per_final else None,
               "nfe_session": sum(len(r) * r.num_steps for r in self.runs) + sum(p.final_steps for p in self.picks),
               "nfe_refine_all": previews * steps if steps else None}
        return out

    def running_line(self) -> str:
        """The session against refining every previewed seed, in one markdown line."""
        t = self.totals()
        if not t["runs"]:
            return "No previews yet in this session."
        head = (f"**This session:** {t['previews']} previews ({t['preview_s']:.2f} s) + {t['finals']} "
                f"final{'s' if t['finals'] != 1 else ''} ({t['final_s']:.2f} s) = **{t['session_s']:.2f} s**")
        if t["refine_all_s"] is None:
            return head + ". Click a tile to refine it; then this line compares with refining every previewed seed."
        ratio = t["refine_all_s"] / max(t["session_s"], 1e-9)
        nfe = t["nfe_refine_all"] / max(t["nfe_session"], 1)
        return (f"{head}  vs  **refining all {t['previews']} previewed seeds: {t['refine_all_s']:.2f} s** "
                f"(estimated: {t['previews']} x {t['seconds_per_final']:.3f} s per final, as this session measured them one at "
                f"a time) -> **{ratio:.1f}x** less "
                f"time; {t['nfe_session']} vs {t['nfe_refine_all']} model evaluations ({nfe:.1f}x).")

    def history_markdown(self) -> str:
        """This session's picks as a markdown table, newest first."""
        if not self.picks:
            return "No picks yet: click a preview tile to refine it."
        key = next(iter(self.picks[0].reward))
        lines = [f"| # | prompt | seed | preview | {key} (preview vs final) | final |", "|---|---|---|---|---|---|"]
        for i, p in reversed(list(enumerate(self.picks, 1))):
            row = "ConsistencySolver" if p.row == LEARNED else p.row
            value = p.reward.get(key, float("nan"))
            lines.append(f"| {i} | {shorten(p.prompt, 48).replace('|', '/')} | {p.seed} | {row} K={p.num_steps} | "
                         f"{value:.2f} | {p.final_steps} steps, {p.seconds:.2f} s |")
        return "\n".join(lines)
