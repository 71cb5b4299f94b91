"""Property-based fuzzing of the pass: generated modules (``tests/strategies.py``) compose the
pattern families in random spellings, with planted near-misses. For every generated module:

- the optimized outputs are as close to a float64 run as the original's are (same dtype,
  shape; error within rounding of the original's own error, see ``assert_outputs_match``);
- the fused sites per family are exactly the ones the generator built;
- every planted near-miss is reported in its family with its reason, and nothing else is.

Three paths: ``fusion_pass.optimize`` (every module); ``torch.compile`` with
``fusion_pass.backend(inner="eager")`` (one module in ten: Dynamo is ~20x slower; its graphs
carry shapes, so shape-only near-misses are checked there); and ``optimize`` with the fused ops
running their Triton kernels under the interpreter (one in ten), so the kernels meet every
operand layout the generator makes.

Profiles (``HYPOTHESIS_PROFILE``, default ``ci``): ``ci`` tries 1,000 / 100 / 100 modules, the
same ones on every run (derandomized, no shrinking on the two slow paths); ``dev`` 100 / 10 / 10;
``explore`` 10,000 / 1,000 / 1,000 new ones each run. Each fuzz test reports what it tried as a
``FuzzStatistics`` warning, which pytest's summary shows without ``-s``.

The tests at the end are the smallest modules showing each bug the fuzzer found.
"""
import copy
import os
import warnings
import zlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, seed, settings

import fusion_pass
from fusion_pass.install import graph_of
from fusion_pass.ops import interpret_on_cpu
from fusion_pass.registry import FUSED_OPS
from patterns import FAMILY_NAMES
from strategies import (
    CHAIN, CHAIN_CONFLICT, DYNAMO, FX, GATE, GATE_MISSES, GELU_CAT_MISSES, LN_MISSES, LN_MOD, NO_PARTNER, QK,
    QK_CAT_MISSES, QK_MISSES, build, expected_near_misses, expected_sites, inputs, programs,
)

SLOW_PATH_SHARE = 10  # torch.compile and the interpreted kernels each try a tenth as many modules
COVERAGE_EXAMPLES = 100  # from this many modules on, a run must have generated every family ...
RARE_FAMILIES = {"qk_rmsnorm_cat": 1000, "residual_layernorm": 1000}  # ... but these from 1,000 on (rare: a pre-LN residual needs an ungated segment before an unfused LayerNorm)
NOT_IN_VOCABULARY = {  # families the generator does not build (yet), and where they are tested instead
    "qk_layernorm": "tests/test_spellings.py, test_diffusers_patterns.py (CogVideoX), test_shapevae.py",
    "qk_rmsnorm_rope": "tests/test_spellings.py, test_diffusers_patterns.py (Flux, HunyuanVideo, LTX)",
    "qk_rmsnorm_cat_rope": "tests/test_spellings.py, test_diffusers_patterns.py (Flux's double blocks)",
}
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci", settings.get_profile("ci"), max_examples=1000, deadline=None, suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("explore", max_examples=10_000, deadline=None, suppress_health_check=_SLOW_IS_FINE)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class FuzzStatistics(UserWarning):
    """What a fuzz test tried (a warning, so that pytest's summary shows it)."""


# Outputs are compared through a float64 run of the same weights and inputs: the optimized
# module's error may exceed the original's by rounding, not more. Generated modules can be
# ill-conditioned (a LayerNorm over nearly equal channels, an RMSNorm of a nearly zero head,
# amplify a 1-ulp difference a thousandfold), so a fixed tolerance would be flaky or loose.
# The bound is ERROR_FACTOR x the larger of the original's own error and its rounding noise
# (how far the original moves when its inputs and weights move by one unit in the last place,
# the worst of NOISE_SAMPLES random such moves), plus ROUNDING[dtype] at the output's scale (of
# the module's dtype: an fp32 output computed from fp16 values carries fp16 rounding). An fp64
# module is its own float64 run (the original's error is 0), and its noise and ROUNDING are
# fp32's: an RMSNorm spelled with `.float()` rounds to fp32 in the original, while the fused op
# keeps fp64 (never less precise). (test_bad_inputs checks that the other spellings keep fp64.)
ERROR_FACTOR = 3
NOISE_SAMPLES = 3
SLACK_UNITS = 8
ROUNDING = {  # SLACK_UNITS units in the last place of the precision the two computations may differ in
    torch.float64: SLACK_UNITS * torch.finfo(torch.float32).eps,
    torch.float32: SLACK_UNITS * torch.finfo(torch.float32).eps,
    torch.bfloat16: SLACK_UNITS * torch.finfo(torch.bfloat16).eps,
    torch.float16: SLACK_UNITS * torch.finfo(torch.float16).eps,
}


def _reason_phrases() -> tuple[str, ...]:
    phrases = {reason for reason, _ in LN_MISSES.values()} | {reason for reason, _ in GATE_MISSES.values()}
    phrases |= {reason for reasons in QK_MISSES.values() for reason in reasons} | {NO_PARTNER, CHAIN_CONFLICT}
    phrases |= set(QK_CAT_MISSES.values()) | set(GELU_CAT_MISSES.values())
    return tuple(sorted(phrases))


REASON_PHRASES = _reason_phrases()


def reported_near_misses(report) -> Counter:
    """``(family, the known phrase its reason contains, or the whole reason)`` -> count."""
    found = Counter()
    for name, family in report.families.items():
        for miss in family.near_misses:
            phrase = next((p for p in REASON_PHRASES if p in miss.reason), miss.reason)
            found[name, phrase] += 1
    return found


def assert_outputs_match(got, want, model, args, dtype):
    """``got`` (optimized) is as close to a float64 run as ``want`` (original) is, per output,
    for a module computing in ``dtype`` (see ERROR_FACTOR)."""
    assert len(got) == len(want)
    slack = ROUNDING[dtype]
    close = [
        not w.numel() or (g.double() - w.double()).abs().max().item() <= 0.5 * slack * w.abs().max().item()
        for g, w in zip(got, want)
    ]
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.dtype, g.shape) == (w.dtype, w.shape), f"output {i}"
    if all(close):
        return  # within rounding of the original everywhere: the bound below holds a fortiori
    reference = copy.deepcopy(model).double()(*(a.double() for a in args))
    noise = _rounding_noise(model, args, want, unit=slack / SLACK_UNITS)
    for i, (g, w, r) in enumerate(zip(got, want, reference)):
        if close[i]:
            continue
        ours, theirs = (g.double() - r).abs().max().item(), (w.double() - r).abs().max().item()
        bound = ERROR_FACTOR * max(theirs, noise[i]) + slack * r.abs().max().item()
        assert ours <= bound, (
            f"output {i}: error {ours:.3g}; the original's {theirs:.3g}, its rounding noise {noise[i]:.3g} ({dtype})"
        )


def _rounding_noise(model, args, want, unit: float) -> list[float]:
    """Per output, the largest change of the original's output when every input and weight
    moves by a relative ``unit`` (one unit in the last place; random signs; NOISE_SAMPLES draws)."""
    generator = torch.Generator().manual_seed(0)

    def nudge(t):
        signs = torch.randint(0, 2, t.shape, generator=generator).to(t.dtype) * 2 - 1
        return t * (1 + unit * signs)

    noise = [0.0] * len(want)
    for _ in range(NOISE_SAMPLES):
        nudged = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in nudged.parameters():
                parameter.copy_(nudge(parameter))
            outputs = nudged(*(nudge(a) for a in args))
        for i, (o, w) in enumerate(zip(outputs, want)):
            if w.numel():
                noise[i] = max(noise[i], (o.double() - w.double()).abs().max().item())
    return noise


def fused_calls(module) -> Counter:
    """Calls of each fused op in the code installed on ``module`` and its submodules."""
    found = Counter()
    for sub in module.modules():
        code = graph_of(sub) or ""
        for key in FUSED_OPS:
            found[key] += code.count(f"fusion_pass_ops_direct_{key}_direct(")
    return found


def check_optimize(program):
    model = build(program)
    args = inputs(program)
    want = model(*args)
    optimized = fusion_pass.optimize(copy.deepcopy(model))
    got = optimized(*args)
    report = fusion_pass.report(optimized)
    assert report.uncaptured == []
    assert report.counts() == expected_sites(program, FX)
    assert reported_near_misses(report) == expected_near_misses(program, FX)
    ops = {fam.name: fam.fused_op for fam in report.families.values()}
    assert fused_calls(optimized) == Counter({ops[name]: n for name, n in report.counts().items() if n})
    assert_outputs_match(got, want, model, args, program.dtype)


def check_compile(program):
    model = build(program)
    args = inputs(program)
    want = model(*args)
    torch._dynamo.reset()
    backend = fusion_pass.backend(inner="eager")
    got = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*args)
    assert backend.graphs_compiled == 1
    assert backend.report.counts() == expected_sites(program, DYNAMO)
    assert reported_near_misses(backend.report) == expected_near_misses(program, DYNAMO)
    assert_outputs_match(got, want, model, args, program.dtype)


def _run_fuzz(name, check, path, max_examples, shrink=True):
    """Run ``check`` on ``max_examples`` generated programs; returns what was tried."""
    tried = Counter()
    phases = tuple(PROFILE.phases) if shrink or not PROFILE.derandomize else tuple(
        phase for phase in PROFILE.phases if phase is not Phase.shrink)

    @settings(PROFILE, max_examples=max_examples, phases=phases)
    @given(program=programs())
    def fuzz(program):
        check(program)
        tried["modules"] += 1
        tried[f"dtype {str(program.dtype).removeprefix('torch.')}"] += 1
        for family, n in expected_sites(program, path).items():
            tried[f"{family} sites"] += n
        tried.update({f"near-miss {miss}": n for miss, n in program.planted().items()})

    if PROFILE.derandomize:  # a different fixed sequence of modules for each path
        fuzz = seed(zlib.crc32(name.encode()))(fuzz)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add synchronisation (5x slower on 2 busy cores)
    try:
        fuzz()
    finally:
        torch.set_num_threads(threads)
    warnings.warn(FuzzStatistics(
        f"{name}: {tried['modules']} generated modules ("
        + ", ".join(f"{key}: {n}" for key, n in sorted(tried.items()) if key != "modules") + ")"
    ))
    return tried


def assert_every_family_was_generated(tried: Counter, examples: int) -> None:
    """Over a run of at least COVERAGE_EXAMPLES modules (RARE_FAMILIES: more), every family had
    fused sites. The ``ci`` profile tries the same modules on every run: this cannot flake there."""
    expected = [family for family in FAMILY_NAMES
                if family not in NOT_IN_VOCABULARY and examples >= RARE_FAMILIES.get(family, COVERAGE_EXAMPLES)]
    assert [family for family in expected if not tried[f"{family} sites"]] == []


def test_optimize_keeps_outputs_and_fuses_exactly_the_generated_sites():
    tried = _run_fuzz("optimize", check_optimize, FX, PROFILE.max_examples)
    assert tried["modules"] >= PROFILE.max_examples
    assert_every_family_was_generated(tried, PROFILE.max_examples)


def test_compile_backend_keeps_outputs_and_fuses_exactly_the_generated_sites():
    examples = max(1, PROFILE.max_examples // SLOW_PATH_SHARE)
    tried = _run_fuzz("torch.compile", check_compile, DYNAMO, examples, shrink=False)
    assert tried["modules"] >= examples
    assert_every_family_was_generated(tried, examples)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter (set on CPU)")
def test_triton_kernels_keep_outputs_of_generated_modules():
    """Chunk views, unsqueezed chunks, [D] vectors, per-token [B, L, 1] operands and
    head-strided q/k, through the kernels rather than the ops' PyTorch reference."""
    examples = max(1, PROFILE.max_examples // SLOW_PATH_SHARE)

    def check_with_kernels(program):
        with interpret_on_cpu():
            check_optimize(program)

    tried = _run_fuzz("optimize, Triton kernels", check_with_kernels, FX, examples, shrink=False)
    assert tried["modules"] >= examples
    assert_every_family_was_generated(tried, examples)


# --- minimal examples of what the fuzzer found ---------------------------------------------------
# Each is the smallest module that shows one finding; the fuzz tests above fail on the same ones.

H = 8


def optimize_report(module, *args):
    want = module(*args)
    optimized = fusion_pass.optimize(copy.deepcopy(module))
    torch.testing.assert_close(optimized(*args), want)
    return fusion_pass.report(optimized)


def compile_report(module, *args):
    torch._dynamo.reset()
    want = module(*args)
    backend = fusion_pass.backend(inner="eager")
    got = torch.compile(module, backend=backend, fullgraph=True, dynamic=False)(*args)
    torch.testing.assert_close(got, want)
    return backend.report


def report_of(path, module, *args):
    return (optimize_report if path == FX else compile_report)(module, *args)


def near_miss_reasons(report, family):
    return [miss.reason for miss in report.families[family].near_misses]


class ModulateNearMiss(torch.nn.Module):
    """``(2 + scale) * LN(x) + shift`` (an offset of 2: a LayerNorm-modulate near-miss) with
    shift and scale chunked from one ``[B, 1, 3D]`` tensor, as in a DiT's adaLN."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(H, elementwise_affine=False)

    def forward(self, x, mod):
        shift, scale, _ = mod.chunk(3, dim=-1)
        return (2 + scale) * self.norm(x) + shift


@pytest.mark.parametrize("path,tokens", [(FX, 5), (DYNAMO, 5), (DYNAMO, 1)])
def test_an_unfused_modulation_is_not_taken_for_a_gated_residual(path, tokens):
    report = report_of(path, ModulateNearMiss(), torch.randn(2, tokens, H), torch.randn(2, 1, 3 * H))
    assert report.counts()[GATE] == 0
    assert near_miss_reasons(report, GATE) == []
    assert [r.split(",")[0] for r in near_miss_reasons(report, LN_MOD)] == ["scale offset is 2"]


class PerTokenGate(torch.nn.Module):
    """``x + y * g(x)`` with a per-token gate ``g(x)`` of shape [B, L, 1] computed from x."""

    def __init__(self):
        super().__init__()
        self.branch, self.gate = torch.nn.Linear(H, H), torch.nn.Linear(H, 1)

    def forward(self, x):
        return x + self.branch(x) * self.gate(x)


def test_a_per_token_gate_computed_from_the_residual_is_a_near_miss_in_either_operand_order():
    report = compile_report(PerTokenGate(), torch.randn(2, 5, H))
    assert report.counts()[GATE] == 0
    assert near_miss_reasons(report, GATE) == ["gate broadcasts over the hidden dim"]


class NormedValues(torch.nn.Module):
    """q, k and v each RMS-normalized; q and k cast with ``.to(v)`` (v is only their dtype)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H, 3 * H)
        self.q_norm, self.k_norm, self.v_norm = (torch.nn.RMSNorm(H // 2) for _ in range(3))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, 2, H // 2).permute(2, 0, 3, 1, 4)
        v = self.v_norm(v)
        q, k = self.q_norm(q), self.k_norm(k)
        return F.scaled_dot_product_attention(q.to(v), k.to(v), v)


@pytest.mark.parametrize("path", [FX, DYNAMO])
def test_a_value_norm_is_not_paired_with_itself_as_query_and_key(path):
    report = report_of(path, NormedValues(), torch.randn(2, 5, H))
    assert report.counts()[QK] == 1
    assert [site.where for site in report.families[QK].sites] != ["v_norm"]
    assert near_miss_reasons(report, QK) == ["RMSNorm does not feed an attention's query or key"]


class ModulatedProductReused(torch.nn.Module):
    """``LN(x) * (1 + scale)`` also returned on its own: a LayerNorm-modulate near-miss."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(H, elementwise_affine=False)
        self.shift, self.scale = torch.nn.Parameter(torch.randn(H)), torch.nn.Parameter(torch.randn(H))

    def forward(self, x):
        product = self.norm(x) * (1 + self.scale)
        return product + self.shift, product


@pytest.mark.parametrize("path", [FX, DYNAMO])
def test_a_reused_modulated_product_is_not_reported_as_a_gate(path):
    report = report_of(path, ModulatedProductReused(), torch.randn(2, 5, H))
    assert near_miss_reasons(report, GATE) == []
    assert len(near_miss_reasons(report, LN_MOD)) == 1


class QKFunctional(torch.nn.Module):
    """q/k normalized by ``F.rms_norm`` (or ``nn.RMSNorm`` modules) before SDPA."""

    def __init__(self, modules: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(H, 3 * H)
        self.modules_ = modules
        self.q_norm, self.k_norm = torch.nn.RMSNorm(H // 2, eps=1e-6), torch.nn.RMSNorm(H // 2, eps=1e-6)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, 2, H // 2).permute(2, 0, 3, 1, 4)
        if self.modules_:
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            q = F.rms_norm(q, (H // 2,), self.q_norm.weight, 1e-6)
            k = F.rms_norm(k, (H // 2,), self.k_norm.weight, 1e-6)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("modules", [False, True], ids=["F.rms_norm", "nn.RMSNorm"])
def test_functional_rms_norm_q_k_pairs_fuse_under_torch_compile(modules):
    report = compile_report(QKFunctional(modules), torch.randn(2, 5, H))
    assert report.counts()[QK] == 1


class ChainThenGateOnResidual(torch.nn.Module):
    """A chained residual -> modulated norm, then ``y + x * gate``: the gate multiplies the
    residual (a near-miss), where the residual is the chained op's output."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(H, elementwise_affine=False)
        self.lin1, self.lin2 = torch.nn.Linear(H, H), torch.nn.Linear(H, H)

    def forward(self, x, mod):
        shift, scale, gate, gate2 = mod.chunk(4, dim=-1)
        x = x + gate * self.lin1(x)
        y = self.lin2((1 + scale) * self.norm(x) + shift)
        return y + x * gate2


@pytest.mark.parametrize("path", [FX, DYNAMO])
def test_a_gate_on_the_residual_after_a_chain_is_reported(path):
    report = report_of(path, ChainThenGateOnResidual(), torch.randn(2, 5, H), torch.randn(2, 1, 4 * H))
    assert report.counts()[CHAIN] == 1
    assert near_miss_reasons(report, GATE) == ["the gate multiplies the residual, not the branch computed from it"]


class ModulationTailAfterSharedInput(torch.nn.Module):
    """``t`` feeds the residual stream, then serves as the shift of a modulated LayerNorm that
    is a near-miss (offset 2): ``t + (2 + s) * LN(x)`` has the shape of a gated residual
    (``LN(x)`` is computed from ``t``), but it is the unfused modulation the report lists."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(H, elementwise_affine=False)
        self.lin = torch.nn.Linear(H, H)

    def forward(self, x, t, mod):
        x = x + t
        x = x + mod * self.lin(x)
        return (2 + mod) * self.norm(x) + t


class PerTokenGateThenShift(torch.nn.Module):
    """A per-token tensor ``tok`` [B, L, 1] gates a residual, then shifts a modulated
    LayerNorm: both are near-misses where shapes are known (they broadcast over the hidden dim)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(H, elementwise_affine=False)
        self.lin = torch.nn.Linear(H, H)

    def forward(self, x, tok, mod):
        x = x + self.lin(x) * tok
        return (1 + mod) * self.norm(x) + tok


@pytest.mark.parametrize("path", [FX, DYNAMO])
def test_an_unfused_modulation_whose_shift_fed_the_residual_is_not_a_gated_residual(path):
    report = report_of(path, ModulationTailAfterSharedInput(), torch.randn(2, 5, H), torch.randn(2, 5, H),
                       torch.randn(2, 1, H))
    assert report.counts()[GATE] == 1  # x + mod * lin(x)
    assert near_miss_reasons(report, GATE) == []


def test_a_per_token_shift_that_gated_the_residual_is_reported_once():
    report = compile_report(PerTokenGateThenShift(), torch.randn(2, 5, H), torch.randn(2, 5, 1), torch.randn(2, 1, H))
    assert near_miss_reasons(report, LN_MOD) == ["shift broadcasts over the hidden dim"]
    assert near_miss_reasons(report, GATE) == ["gate broadcasts over the hidden dim"]


# --- spellings torch.compile fuses and optimize() does not (found beside the fuzzer) ------------

class QKCastBackWithType(torch.nn.Module):
    """The upcast RMSNorm cast back with ``.type(x.dtype)`` (normalize.py lists ``x.type(dtype)``)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H, 3 * H)
        self.q_scale, self.k_scale = torch.nn.Parameter(torch.ones(H // 2)), torch.nn.Parameter(torch.ones(H // 2))

    @staticmethod
    def norm(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type(x.dtype) * weight

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, 2, H // 2).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(self.norm(q, self.q_scale), self.norm(k, self.k_scale), v)


class QKCastRightAway(torch.nn.Module):
    """``q = q_norm(q).to(v)`` before ``k = k_norm(k).to(v)``: q's cast runs before k's norm."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(H, 3 * H)
        self.q_norm, self.k_norm = torch.nn.RMSNorm(H // 2, eps=1e-6), torch.nn.RMSNorm(H // 2, eps=1e-6)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, 2, H // 2).permute(2, 0, 3, 1, 4)
        q = self.q_norm(q).to(v)
        k = self.k_norm(k).to(v)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("path", [FX, DYNAMO])
@pytest.mark.parametrize("module", [QKCastBackWithType, QKCastRightAway], ids=lambda cls: cls.__name__)
def test_q_k_spellings_fuse_on_both_paths(module, path):
    report = report_of(path, module(), torch.randn(2, 5, H))
    assert report.counts()[QK] == 1
    assert near_miss_reasons(report, QK) == []
