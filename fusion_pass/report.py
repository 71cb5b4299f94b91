"""The report of one pass run: per family, the sites fused and the near-misses with reasons.

Nothing in the pass prints: ``optimize``, the compile backend and the CLI build a
:class:`Report`, and the CLI/logs render it (``rich`` table or JSON).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text


@dataclass(frozen=True)
class Site:
    where: str
    detail: str = ""


@dataclass(frozen=True)
class Miss:
    where: str
    reason: str


@dataclass
class FamilyReport:
    name: str
    math: str
    fused_op: str
    sites: list[Site] = field(default_factory=list)
    near_misses: list[Miss] = field(default_factory=list)
    covers: tuple[str, ...] = ()  # a chained family: each site is also one site of these
    folded: list[Site] = field(default_factory=list)  # fused, then folded into a later family's call

    @property
    def count(self) -> int:
        """Fused calls of this family in the rewritten graphs."""
        return len(self.sites)

    @property
    def fused(self) -> int:
        """Sites fused, whether their call runs on its own or was folded into a later one."""
        return len(self.sites) + len(self.folded)


@dataclass
class Report:
    """What one pass run did. ``source`` is ``"optimize"`` or ``"backend"``."""

    source: str
    families: dict[str, FamilyReport] = field(default_factory=dict)
    graphs: list[str] = field(default_factory=list)           # module paths captured
    uncaptured: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    already_optimized: list[str] = field(default_factory=list)
    assumptions: list[tuple[str, str]] = field(default_factory=list)  # (graph path, guarded predicate)
    guards: list[tuple[str, str]] = field(default_factory=list)  # (graph path, what its installed forward checks)
    fallbacks: list[tuple[str, str, int]] = field(default_factory=list)  # (module path, reason, calls) at run time
    pending: list[tuple[str, str]] = field(default_factory=list)  # (module path, why): captured on its first call
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """Fused calls per family (a chained site counts once, under its chained family; a
        folded site only within the call of the family that folded it)."""
        return {name: fam.count for name, fam in self.families.items()}

    def totals(self) -> dict[str, int]:
        """Sites per elementary family, chained sites counted toward each family they cover,
        folded sites toward their own family."""
        totals = {name: fam.fused for name, fam in self.families.items() if not fam.covers}
        for fam in self.families.values():
            for covered in fam.covers:
                totals[covered] = totals.get(covered, 0) + fam.fused
        return totals

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "seconds": round(self.seconds, 4),
            "counts": self.counts(),
            "totals": self.totals(),
            "families": {name: asdict(fam) | {"count": fam.count} for name, fam in self.families.items()},
            "graphs": self.graphs,
            "uncaptured": [{"where": w, "reason": r} for w, r in self.uncaptured],
            "already_optimized": self.already_optimized,
            "assumptions": [{"graph": g, "assumes": a} for g, a in self.assumptions],
            "guards": [{"graph": g, "checks": c} for g, c in self.guards],
            "fallbacks": [{"where": w, "reason": r, "calls": n} for w, r, n in self.fallbacks],
            "pending": [{"where": w, "why": r} for w, r in self.pending],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def merge(self, other: "Report") -> None:
        """Fold another run's findings (e.g. one more Dynamo graph) into this report."""
        for name, fam in other.families.items():
            mine = self.families.setdefault(name, FamilyReport(fam.name, fam.math, fam.fused_op, covers=fam.covers))
            mine.sites.extend(fam.sites)
            mine.folded.extend(fam.folded)
            mine.near_misses.extend(fam.near_misses)
        self.graphs.extend(other.graphs)
        self.uncaptured.extend(other.uncaptured)
        self.already_optimized.extend(other.already_optimized)
        self.assumptions.extend(other.assumptions)
        self.guards.extend(other.guards)
        self.fallbacks.extend(other.fallbacks)
        self.pending.extend(other.pending)
        self.seconds += other.seconds

    def __rich__(self):
        return Group(*self.renderables())

    def renderables(self, max_sites: int = 4):
        title = f"fusion_pass ({self.source}): {self.total} fused calls in {self.seconds:.2f} s"
        summary = Table(title=title)
        for column in ("family", "sites", "near-misses", "where (first sites)"):
            summary.add_column(column, overflow="fold")
        for fam in self.families.values():
            covers = f" (counts for {' + '.join(fam.covers)})" if fam.covers else ""
            folded = f" (+{len(fam.folded)} folded)" if fam.folded else ""
            summary.add_row(fam.name + covers, f"{fam.count}{folded}", str(len(fam.near_misses)),
                            _abbreviate([s.where for s in fam.sites], max_sites))
        legend = Table(title="what each family fuses", show_header=True)
        for column in ("family", "math", "fused op (fusion_pass::)"):
            legend.add_column(column, overflow="fold")
        for fam in self.families.values():
            legend.add_row(fam.name, fam.math, fam.fused_op)
        parts = [summary, legend]
        misses = [(fam.name, m) for fam in self.families.values() for m in fam.near_misses]
        if misses:
            table = Table(title="near-misses (left unfused)")
            for column in ("family", "where", "reason"):
                table.add_column(column, overflow="fold")
            for name, miss in misses:
                table.add_row(name, miss.where, miss.reason)
            parts.append(table)
        if self.uncaptured:
            parts.append(_grouped("not traceable as a whole, so run as before while their children were captured:",
                                  self.uncaptured))
        if self.assumptions:
            text = Text("captured under assumptions, checked every call (the original forward runs when one fails):\n")
            for graph, assumption in self.assumptions:
                text.append(f"  {graph or '<root>'}: {assumption}\n")
            parts.append(text)
        if self.pending:
            parts.append(_grouped(f"not yet called ({len(self.pending)} modules), so not yet captured:", self.pending))
        if self.guards:
            parts.append(_grouped("checked on every call of an installed graph:", self.guards))
        if self.fallbacks:
            table = Table(title="run-time fallbacks (a check failed on a call)")
            for column in ("where", "reason", "calls"):
                table.add_column(column, overflow="fold")
            for where, reason, calls in self.fallbacks:
                table.add_row(where or "<root>", reason, str(calls))
            parts.append(table)
        if self.already_optimized:
            parts.append(Text(f"already optimized, left as is: {len(self.already_optimized)} modules"))
        return parts


def _grouped(title: str, rows: list[tuple[str, str]]) -> Text:
    """One line per distinct text: ``  first_place and N more: text``."""
    text = Text(title + "\n")
    for what, n in Counter(what for _, what in rows).items():
        first = next(where for where, w in rows if w == what) or "<root>"
        text.append(f"  {n} x {first}{' and similar' if n > 1 else ''}: {what}\n")
    return text


def _abbreviate(items: list[str], limit: int) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... (+{len(items) - limit})"
