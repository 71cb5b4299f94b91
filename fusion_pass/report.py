"""The report of one pass run: per family, the sites fused and the near-misses with reasons.

Nothing in the pass prints: ``optimize``, the compile backend and the CLI build a
:class:`Report`, and render it through :meth:`Report.sections`: ``rich.print(report)`` and
the CLI print those renderables, ``str(report)`` is the same as plain text (no colour, module
names never broken at any width), ``report.to_json()`` is for machines. A new kind of row
(e.g. the guards each graph holds) is one more section method listed in ``sections``.

``strict_failures`` is the one definition of ``optimize(strict=True)`` and ``--strict``.
"""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

#: ``str(report)`` renders at the terminal's width, or this where there is none (pipes, logs).
PLAIN_WIDTH = 100


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


@dataclass(frozen=True)
class ReferenceRun:
    """Calls of a fused op that declined its kernel and ran its PyTorch reference (at run time):
    the site still counts as fused (a graph rewrite), but no kernel ran for these calls."""

    op: str
    reason: str
    example: str  # the first call signature's operand shapes and dtypes
    signatures: int  # call signatures (shapes, strides, dtypes) seen declining for this reason
    where: str  # the innermost module of the model whose calls declined ("" outside the model)


#: Kernel declines of other callers listed in a report (the rest are counted).
MAX_ELSEWHERE = 4


@dataclass(repr=False)
class Report:
    """What one pass run did. ``source`` is ``"optimize"`` or ``"backend"``."""

    source: str
    families: dict[str, FamilyReport] = field(default_factory=dict)
    graphs: list[str] = field(default_factory=list)           # module paths captured
    uncaptured: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    already_optimized: list[str] = field(default_factory=list)
    assumptions: list[tuple[str, str]] = field(default_factory=list)  # (graph path, guarded predicate)
    uncaptured_errors: dict[str, str] = field(default_factory=dict)  # path -> the exception, for --json
    guards: list[tuple[str, str]] = field(default_factory=list)  # (graph path, what its installed forward checks)
    fallbacks: list[tuple[str, str, int]] = field(default_factory=list)  # (module path, reason, calls) at run time
    pending: list[tuple[str, str]] = field(default_factory=list)  # (module path, why): captured on its first call
    reference_runs: list[ReferenceRun] = field(default_factory=list)  # fused ops whose kernel declined calls
    declined_elsewhere: list[ReferenceRun] = field(default_factory=list)  # such records first made outside this model
    by_design: list[tuple[str, str]] = field(default_factory=list)  # (op, why): calls of the model that ran the
    # reference by design (CPU tensors outside interpret_on_cpu(), meta tensors): no kernel ran, none was declined
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
            "uncaptured": [{"where": w, "reason": r, "error": self.uncaptured_errors.get(w, "")}
                           for w, r in self.uncaptured],
            "already_optimized": self.already_optimized,
            "assumptions": [{"graph": g, "assumes": a} for g, a in self.assumptions],
            "guards": [{"graph": g, "checks": c} for g, c in self.guards],
            "fallbacks": [{"where": w, "reason": r, "calls": n} for w, r, n in self.fallbacks],
            "pending": [{"where": w, "why": r} for w, r in self.pending],
            "reference_runs": [asdict(run) for run in self.reference_runs],
            "declined_elsewhere": [asdict(run) for run in self.declined_elsewhere],
            "by_design": [{"op": op, "why": why} for op, why in self.by_design],
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
        self.uncaptured_errors.update(other.uncaptured_errors)
        self.guards.extend(other.guards)
        self.fallbacks.extend(other.fallbacks)
        self.pending.extend(other.pending)
        self.reference_runs.extend(other.reference_runs)
        self.declined_elsewhere.extend(other.declined_elsewhere)
        self.by_design.extend(other.by_design)
        self.seconds += other.seconds

    @property
    def near_miss_count(self) -> int:
        return sum(len(fam.near_misses) for fam in self.families.values())

    def strict_failures(self) -> list[str]:
        """Why this run is not "strict": empty when every family that has a candidate in the
        model fused (a family with no candidate at all is fine: not every DiT has every
        pattern), every near-miss has a reason, something fused at all (a model where
        nothing fused, e.g. because nothing could be captured, is not a pass that worked), and no
        fused op of the model's calls so far declined its kernel (the reference ran instead)."""
        failures = [f"{run.op} declined its kernel at {run.where} ({run.reason}): its PyTorch reference ran"
                    for run in self.reference_runs]
        totals = self.totals()
        for name, fam in self.families.items():
            if not fam.covers and fam.near_misses and totals.get(name, 0) == 0:
                first = fam.near_misses[0]
                failures.append(f"{name} fused none of its {len(fam.near_misses)} candidates "
                                f"({first.where or '<root>'}: {first.reason})")
            unexplained = [m.where or "<root>" for m in fam.near_misses if not m.reason.strip()]
            if unexplained:
                failures.append(f"{name} left {', '.join(unexplained)} unfused without a reason")
        if self.total == 0 and not failures:
            uncaptured = f"; {len(self.uncaptured)} modules could not be captured" if self.uncaptured else ""
            pending = (f"; {len(self.pending)} modules are captured on their first call: call the model, then read "
                       "fusion_pass.report(model)") if self.pending else ""
            failures.append(f"nothing fused: no candidate for {', '.join(self.families)} in this model{uncaptured}{pending}")
        return failures

    # --- rendering ------------------------------------------------------------------------

    def __rich__(self) -> Group:
        return Group(*self.sections())

    def __str__(self) -> str:
        """The CLI's report as plain text (no colour), at the terminal's width or ``PLAIN_WIDTH``."""
        return render_plain(self, shutil.get_terminal_size((PLAIN_WIDTH, 24)).columns)

    def __repr__(self) -> str:
        declined = f", {len(self.reference_runs)} kernel declines" if self.reference_runs else ""
        return (f"<Report {self.source}: {self.total} fused calls, {self.near_miss_count} near-misses{declined}, "
                f"{self.seconds:.1f} s>")

    def sections(self, max_sites: int = 4) -> list:
        """The report as rich renderables, in reading order. Tables hold numbers; names and
        sentences are listed under a heading and wrap at spaces, so a module name is never
        split at any width."""
        parts = [self._summary(), self._reference_runs(), self._by_design(), self._first_sites(max_sites), self._legend(),
                 self._near_misses(), self._uncaptured(), self._assumptions(), self._pending(), self._guards(),
                 self._fallbacks(), self._already_optimized()]
        return [part for part in parts if part is not None]

    def _summary(self) -> Table:
        summary = Table(title=f"fusion_pass ({self.source}): {self.total} fused calls in {self.seconds:.2f} s",
                        title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("family", "fused calls", "near-misses"):
            summary.add_column(column, no_wrap=True)
        for fam in self.families.values():
            folded = f" (+{len(fam.folded)} folded)" if fam.folded else ""
            summary.add_row(fam.name, f"{fam.count}{folded}", str(len(fam.near_misses)))
        return summary

    def _reference_runs(self):
        """Sites counted above whose op declined its kernel at run time and ran its PyTorch reference;
        then declines first recorded outside this model (another model of the process may have
        declined a signature this model calls too: each signature is recorded once)."""
        def row(run: ReferenceRun, where: str) -> tuple[str, str]:
            more = f" and {run.signatures - 1} more call signatures" if run.signatures > 1 else ""
            return run.op, f"{where}: {run.reason}: {run.example}{more}"

        rows = [row(run, run.where) for run in self.reference_runs]
        rows += [row(run, "first declined outside this model (the same shapes here decline too)")
                 for run in self.declined_elsewhere[:MAX_ELSEWHERE]]
        if len(self.declined_elsewhere) > MAX_ELSEWHERE:
            rows.append(("...", f"{len(self.declined_elsewhere) - MAX_ELSEWHERE} more declines outside this model "
                                "(fusion_pass.ops.reference_runs.reference_runs())"))
        return _listing(f"kernel declined on {len(self.reference_runs)} fused ops: the PyTorch reference ran for these "
                        "calls (their sites count above as fused graph rewrites, but no kernel ran):", rows)

    def _by_design(self):
        """Calls on devices where the fused ops are their PyTorch references by design (the CPU)."""
        by_why: dict[str, list[str]] = {}
        for op, why in self.by_design:
            by_why.setdefault(why, []).append(op)
        return _listing("the PyTorch references ran, by design (no kernel declined):",
                        [(None, f"{why}: {', '.join(ops)}") for why, ops in by_why.items()])

    def _first_sites(self, max_sites: int):
        rows = [(fam.name, _first_names([s.where for s in fam.sites], max_sites))
                for fam in self.families.values() if fam.sites]
        return _listing("where (first sites):", rows)

    def _legend(self):
        return _listing("what each family fuses:", [
            (fam.name, f"{fam.math} -> fusion_pass::{fam.fused_op}"
                       + (f"; each site counts for {' + '.join(fam.covers)}" if fam.covers else ""))
            for fam in self.families.values()])

    def _near_misses(self):
        grouped: dict[tuple[str, str], list[str]] = {}
        for fam in self.families.values():
            for miss in fam.near_misses:
                grouped.setdefault((fam.name, miss.reason), []).append(miss.where or "<root>")
        return _listing("near-misses (left unfused):", [
            (family, f"{_first_names(where, 2)}: {reason}") for (family, reason), where in grouped.items()])

    def _uncaptured(self):
        return _listing("not captured as a whole (they run their own forward; their children were captured):",
                        _grouped(self.uncaptured))

    def _pending(self):
        return _listing(f"not yet called ({len(self.pending)} modules), so not yet captured:", _grouped(self.pending))

    def _guards(self):
        return _listing("checked on every call of an installed graph:", _grouped(self.guards))

    def _fallbacks(self):
        return _listing("run-time fallbacks (a check failed on a call):",
                        [(None, f"{where or '<root>'}: {reason} ({calls} calls)") for where, reason, calls in self.fallbacks])

    def _assumptions(self):
        """One line per distinct assumption; one made in many modules (``path: what``, e.g. a
        chunk's number of pieces in every block) is listed once with its count and first module."""
        rows = []
        for graph, assumption in self.assumptions:
            module, sep, what = assumption.partition(": ")
            inside = sep and " " not in module and "(" not in module  # a module path, then the assumption
            where = ".".join(p for p in (graph, module) if p) if inside else graph
            rows.append((where, what if inside else assumption))
        return _listing("captured under assumptions, checked every call (the original forward runs when one fails):",
                        _grouped(rows))

    def _already_optimized(self) -> Text | None:
        if not self.already_optimized:
            return None
        return Text(f"already optimized, left as is: {len(self.already_optimized)} modules")


def _listing(title: str, rows: list[tuple[str | None, str]]) -> Group | None:
    """A bold heading over indented items ``(label, text)``; an item's text wraps at spaces and
    its continuation lines stay indented under it. None when there are no items."""
    if not rows:
        return None
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)  # indent
    labelled = any(label for label, _ in rows)
    if labelled:
        grid.add_column(no_wrap=True, style="bold")
    grid.add_column(overflow="fold")
    for label, text in rows:
        grid.add_row(" ", *((f"{label}:",) if labelled else ()), text)
    return Group(Text(title, style="bold"), grid, Text(""))


def _grouped(rows: list[tuple[str, str]]) -> list[tuple[None, str]]:
    """One item per distinct text: ``first_place and similar: text`` (with the count)."""
    items = []
    for what, n in Counter(what for _, what in rows).items():
        first = next(where for where, w in rows if w == what) or "<root>"
        items.append((None, f"{n} x {first}{' and similar' if n > 1 else ''}: {what}"))
    return items


def render_plain(renderable, width: int = PLAIN_WIDTH) -> str:
    """``renderable`` (a report, a table, ...) as plain text ``width`` columns wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, soft_wrap=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()) + "\n"


def _first_names(names: list[str], limit: int) -> str:
    """``"a, b and 7 more"``: the first ``limit`` names."""
    rest = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {rest} more" if rest > 0 else "")
