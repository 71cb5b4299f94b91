"""``optimize(model)``: the in-place one-liner, and ``report``/``restore`` around it."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from fusion_pass.cuda_graphs import new_pool
from fusion_pass.install import restore as _restore
from fusion_pass.precompile import warm_triton
from fusion_pass.report import ReferenceRun, Report
from fusion_pass.session import Session

_REPORT_ATTR = "_fusion_pass_report"


class NothingFused(RuntimeError):
    """``strict=True`` and the run fell short of :meth:`Report.strict_failures`: a selected family
    that has candidates in the model fused none of them, a near-miss has no reason, or nothing
    fused at all. The report is still available as ``fusion_pass.report(model)``."""


def optimize(
    model: nn.Module, *, patterns: Iterable[str] | None = None, strict: bool = False, cuda_graphs: bool = False
) -> nn.Module:
    """Rewrite ``model`` in place to call fused kernels; returns the same object.

    Captures each capturable module's forward (whole model first, else its children),
    matches the pattern families (all, or those named in ``patterns``), and installs the
    rewritten forward on the modules where something fused. Parameters, buffers, the
    module tree and ``state_dict()`` are untouched. Safe to call twice (the second call
    skips modules already optimized). ``strict=True`` raises :class:`NothingFused` when a
    selected family has candidates but fused none (a family with no candidate in this model is
    fine), a near-miss has no reason, or nothing fused (``Report.strict_failures``). ``cuda_graphs=True`` replays each optimized module as a
    CUDA graph on CUDA inputs with autograd off (one launch per module; outputs are reused
    buffers, as with ``mode="reduce-overhead"``: see ``fusion_pass.cuda_graphs``). The report
    is available as ``fusion_pass.report(model)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() expects a torch.nn.Module, got {type(model).__name__}")
    families = _select(patterns)
    warm_triton(model)
    pool = new_pool() if cuda_graphs else None
    session = model.__dict__.get(_REPORT_ATTR)
    if isinstance(session, Session):
        session.begin(families, pool)  # the same object: a change guard watching the root's __dict__ still holds
    else:
        session = Session(families, pool)
        object.__setattr__(model, _REPORT_ATTR, session)  # before capture and arming: part of the snapshot
    session.optimize(model)
    shortfalls = session.report().strict_failures() if strict else []
    if shortfalls:
        raise NothingFused("strict: " + "; ".join(shortfalls))
    return model


def report(model: nn.Module) -> Report:
    """What ``optimize`` installed on ``model`` and what its checks did since (raises if it
    was never optimized). Modules compiled by Dynamo on their first call are listed as pending
    until then; fused ops that declined their kernel on calls made inside ``model`` (and ran
    their PyTorch reference) are listed as ``reference_runs``."""
    found = model.__dict__.get(_REPORT_ATTR)
    if found is None:
        raise LookupError("this model has not been through fusion_pass.optimize()")
    result = found.report()
    result.reference_runs, result.declined_elsewhere, result.by_design = _reference_runs(model)
    return result


def _reference_runs(model: nn.Module) -> tuple[list[ReferenceRun], list[ReferenceRun], list[tuple[str, str]]]:
    """The kernel declines of this process (``fusion_pass.ops.reference_runs``): those first recorded
    on calls made inside ``model``, with the innermost module's path, and the others; and the ops
    of ``model``'s calls that ran their reference by design (op, why: CPU tensors, meta)."""
    from fusion_pass.ops import reference_runs  # imports the ops (and triton): not at import time

    names = {id(module): name for name, module in model.named_modules()}
    here, elsewhere = [], []
    for run in reference_runs.reference_runs():
        where = run.path_in(names)
        (elsewhere if where is None else here).append(
            ReferenceRun(run.op, run.reason, run.example, run.signatures, where or ""))
    if reference_runs.unlisted():
        elsewhere.append(ReferenceRun("...", f"past {reference_runs.MAX_RECORDS} records, not listed", "",
                                      reference_runs.unlisted(), ""))
    by_design = [(run.op, run.reason) for run in reference_runs.by_design() if run.path_in(names) is not None]
    return here, elsewhere, by_design


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: every module runs its own forward again; returns ``model``."""
    _restore(model)
    model.__dict__.pop(_REPORT_ATTR, None)
    return model


def _select(names):
    from patterns import select  # not at import time: `patterns` imports fusion_pass itself

    if isinstance(names, str):
        names = [names]
    return select(names)
