"""``backend="fusion_pass"`` works however the name is first reached, in a fresh process:
through the entry point alone (the process never imports fusion_pass itself), after
``import fusion_pass``, and after importing the backend module directly.

Each case runs in its own subprocess, since the registry is per process and the other tests
import fusion_pass. The compile goes through the registered default (inner Inductor), whose C++
compile on a CPU dominates the test's time (9 s warm, 30 s with an empty Inductor cache on the
2-core box; a lookup-only child takes 4.5 s, mostly importing torch), so only the entry-point
case compiles; the others check the lookup, which is what used to fail.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# One adaLN modulation: LayerNorm(x) * (1 + scale) + shift, the layernorm_modulate family's math.
MODULE = """
    import sys
    import torch
    from torch import nn

    class AdaLN(nn.Module):
        def __init__(self, dim=8):
            super().__init__()
            self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

        def forward(self, x, shift, scale):
            return self.norm(x) * (1 + scale) + shift
"""


def run_child(body: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    code = textwrap.dedent(MODULE) + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compile_by_name_in_a_process_that_never_imported_fusion_pass():
    out = run_child("""
        torch.manual_seed(0)
        model = AdaLN()
        x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
        assert "fusion_pass" not in sys.modules
        compiled = torch.compile(model, backend="fusion_pass", fullgraph=True)
        torch.testing.assert_close(compiled(x, shift, scale), model(x, shift, scale))
        from fusion_pass.dynamo_backend import last_report
        print(last_report().counts()["layernorm_modulate"])
    """)
    assert out.split() == ["1"]  # the module's one LayerNorm -> modulate


@pytest.mark.parametrize("first_import", ["import fusion_pass", "import fusion_pass.dynamo_backend"])
def test_the_name_resolves_to_the_registered_backend_after_importing_fusion_pass(first_import):
    out = run_child(f"""
        {first_import}
        from torch._dynamo import lookup_backend, list_backends
        from fusion_pass.dynamo_backend import fusion_pass_backend
        assert lookup_backend("fusion_pass") is fusion_pass_backend
        assert lookup_backend("fusion_pass") is fusion_pass_backend  # a second lookup too
        print(list_backends(exclude_tags=()).count("fusion_pass"))
    """)
    assert out.split() == ["1"]
