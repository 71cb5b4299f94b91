"""Where the compile backend's compile time goes (CUDA only): cProfile of the first call of
`torch.compile(model, backend=fusion_pass.backend(inner="inductor", inductor_launches=...))` on
the official Hunyuan3D-2 DiT in fp16, printing the top functions by cumulative and by own time.

Run from the repository root with hy3dgen importable and fresh Inductor/Triton caches:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) \
        python3 benchmarks/profile_backend_compile.py 1      # 1: inductor_launches=True, 0: False
"""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fusion_pass  # noqa: E402
from reference_models import example_inputs, load_official  # noqa: E402


def main() -> None:
    launches = sys.argv[1:] == ["1"]
    torch.manual_seed(0)
    model = load_official("hunyuan3d-2", device="cuda", dtype=torch.float16).eval()
    inputs = example_inputs("hunyuan3d-2", dtype=torch.float16, device="cuda", seed=0)
    compiled = torch.compile(model, backend=fusion_pass.backend(inner="inductor", inductor_launches=launches))
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    with torch.no_grad():
        inputs.call(compiled)
    torch.cuda.synchronize()
    profile.disable()
    print(f"inductor_launches={launches}: first call {time.perf_counter() - start:.1f} s (under cProfile)")
    stats = pstats.Stats(profile).sort_stats("cumulative")
    stats.print_stats(r"torch|triton|fusion_pass", 45)
    stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
