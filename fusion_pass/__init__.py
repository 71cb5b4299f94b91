"""fusion_pass: fuse adaLN modulation, gated residuals and q/k RMSNorm of diffusion
transformers into Triton kernels, without editing the model.

Pipeline (one module each): ``capture`` -> ``normalize`` -> ``match`` (+ ``patterns/``)
-> ``rewrite`` -> ``install`` (run). Kernels live apart in ``fusion_pass.ops``.
"""
from fusion_pass.api import NothingFused, optimize, report, restore
from fusion_pass import dynamo_backend as _registers_backend  # noqa: F401  (backend="fusion_pass")

__all__ = ["optimize", "report", "restore", "backend", "NothingFused"]


def backend(*args, **kwargs):
    """A ``torch.compile`` backend; see :func:`fusion_pass.dynamo_backend.make_backend`."""
    from fusion_pass.dynamo_backend import make_backend

    return make_backend(*args, **kwargs)
