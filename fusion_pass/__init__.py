"""fusion_pass: fuse adaLN modulation, gated residuals and q/k RMSNorm of diffusion
transformers into Triton kernels, without editing the model.

Pipeline (one module each): ``capture`` -> ``normalize`` -> ``match`` (+ ``patterns/``)
-> ``rewrite`` -> ``install`` (run). Kernels live apart in ``fusion_pass.ops``.

The public names load on first use (``fusion_pass.optimize`` imports torch and the pass), so
``import fusion_pass`` and the ``fusion-pass`` CLI's ``--help``/``--version`` stay instant.
``torch.compile(model, backend="fusion_pass")`` finds the backend through the package's entry
point (``torch_dynamo_backends``); see ``fusion_pass.dynamo_backend``.
"""
from __future__ import annotations

import importlib

# The submodule ``fusion_pass.report`` (the Report class; no torch) is imported first, so that
# the import system binds its name here now and never again: the public ``fusion_pass.report``
# is the function below (``report(model)``), loaded on first use like the others.
from fusion_pass import report as _report_module  # noqa: F401

del report  # noqa: F821 - the submodule's binding; __getattr__ provides the function

__all__ = ["optimize", "report", "restore", "backend", "NothingFused"]

#: public name -> (module, attribute) that defines it
_PUBLIC = {
    "optimize": ("fusion_pass.api", "optimize"),
    "report": ("fusion_pass.api", "report"),
    "restore": ("fusion_pass.api", "restore"),
    "NothingFused": ("fusion_pass.api", "NothingFused"),
    "backend": ("fusion_pass.dynamo_backend", "make_backend"),
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fusion_pass' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
