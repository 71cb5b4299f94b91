"""The pass over one graph: normalize -> match + rewrite, shared by ``optimize`` (FX graphs
we capture) and the ``torch.compile`` backend (graphs Dynamo hands us)."""
from __future__ import annotations

from typing import Sequence

from torch import fx, nn

from fusion_pass import debug
from fusion_pass.match import MatchContext, PatternFamily
from fusion_pass.normalize import normalize
from fusion_pass.report import FamilyReport, Miss, Report, Site
from fusion_pass.rewrite import RewriteResult, rewrite


def fuse_graph(
    graph: fx.Graph, families: Sequence[PatternFamily], *, root: nn.Module | None = None, path: str = ""
) -> RewriteResult:
    """Normalize ``graph`` and apply every family's exact rewrites to it, in place."""
    debug.dump(path, "captured", graph)
    normalize(graph, root)
    debug.dump(path, "normalized", graph)
    result = rewrite(graph, families, MatchContext(path=path, root=root))
    if result.matches:
        debug.dump(path, "rewritten", graph)
    return result


def empty_report(source: str, families: Sequence[PatternFamily]) -> Report:
    from fusion_pass.registry import FUSED_OPS

    report = Report(source)
    for family in families:
        report.families[family.name] = FamilyReport(
            family.name, family.math, FUSED_OPS[family.op_key].key, covers=tuple(family.covers)
        )
    return report


def record(report: Report, result: RewriteResult) -> None:
    for match in result.matches:
        report.families[match.family].sites.append(Site(match.where, match.detail))
    for match in result.folded:
        report.families[match.family].folded.append(Site(match.where, match.detail))
    for miss in result.near_misses:
        report.families[miss.family].near_misses.append(Miss(miss.where, miss.reason))
