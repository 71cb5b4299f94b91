"""Time the fused model against eager PyTorch, torch.compile and the fusion backend, side by side.

One process, one GPU, every mode measured on the same seeded random weights and inputs. A
"group" is one config x dtype: the model is built once per config in float32, cast to the dtype,
and each mode runs a deepcopy of that cast model on one denoising step (B=2: the CFG batch).

modes (--modes; all by default)
  eager                        the model as written
  optimize                     fusion_pass.optimize() on a deepcopy
  optimize+cudagraph           fusion_pass.optimize(model, cuda_graphs=True): every optimized module
                               (the whole model, when it is captured as one graph) captured on its
                               first call, replayed after; checked against the optimized model
                               without replay on two input sets
  compile                      torch.compile, default Inductor
  compile-reduce-overhead      torch.compile(mode="reduce-overhead") (Inductor + CUDA graphs)
  backend-inductor             torch.compile(backend=fusion_pass.backend(inner="inductor"))
  backend-eager                torch.compile(backend=fusion_pass.backend(inner="eager"))
  backend-inductor-cudagraphs  fusion_pass.backend(inner="inductor", cudagraphs=True)
The five torch.compile modes run only in the groups --compile-groups selects (by default the
float16 groups: a 1.1B compile takes 60-85 s each), and only while --time-budget allows: a mode
that would not fit is skipped (and says so), the least important first. Compiles are cold (fresh
Inductor/Triton caches per run, shared by the modes of the run) unless --keep-compile-cache.

figures per mode
  step ms       median, p10, p90 of --repeat steps after --warmup (CUDA events around each call;
                for CUDA-graph modes the replay, including the copy into its static inputs)
  setup s       optimize: wall time of optimize(); optimize+cudagraph: optimize() + warm-up +
                capture; compile and backend modes: torch.compile() + the first call (the compile)
  peak MB       torch.cuda.max_memory_allocated() over set-up and steady-state steps, minus what
                was allocated before the mode started: its weight copy, activations, CUDA-graph
                pools (allocated at capture). The JSON also has the steady-state-only peak and
                the growth of reserved memory (which holds CUDA-graph pools in full)
  err           ||out - ref|| / ||ref|| in fp32, ref = eager in the same dtype, and ref = the
                float32 model on the same inputs cast to float32
  kernels       kernels per step (torch.profiler, CUDA activity) and the share of kernel time in
                GEMM + attention; the top-20 kernel tables of eager and optimize are the profiles
end to end (--e2e): the official flow-matching Euler loop (sigmas linspace(0, 1, steps), CFG with a
doubled batch, guidance 5.0) with eager, optimize, optimize+cudagraph and the fastest torch.compile
and fusion-backend modes: total denoise time and final-latent error vs eager (and vs float32).

outputs, all directly in --out: bench.json (every number, the environment, argv), bench.md,
bench.png (step time per mode), profile_eager.txt, profile_optimize.txt.
Without CUDA the command stops with one line unless --allow-cpu is given: then it runs a tiny smoke
version (config tiny, float32, eager/optimize/backend-eager, host timers) writing the same files.

exit status: 0 every selected mode ran; 3 some mode failed (recorded, the run went on);
2 bad arguments or no CUDA GPU; 124 stopped by SIGTERM or the time limit (files still written).

package layout (what is measured -> how -> written)
  spec.py        the modes, dtypes and defaults: what is measured
  settings.py    the options and the parsed Settings
  modes.py       one group's model and inputs; how each mode is set up (a Prepared step)
  timing.py      CUDA-event timing, percentiles, errors, memory figures
  profiling.py   the kernel profile and its GEMM / attention / other classes
  measure.py     one mode: set-up, warm-up, timing, memory, errors, profile
  e2e.py         the end-to-end denoising loop
  runner.py      the run: plan, time budget, groups, SIGTERM; `run` and `main`
  targets.py     the issue's targets, PASS / MISS
  output.py      bench.json, bench.md, bench.png, profile_*.txt and the console summary
  environment.py the machine and versions
"""
from .runner import main, run
from .settings import add_arguments
from .spec import FILES, MODES

__all__ = ["FILES", "MODES", "add_arguments", "main", "run"]
