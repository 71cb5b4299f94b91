import sys, inspect, torch, gc
sys.path.insert(0, "tests")
import fusion_pass
from diffusers_models import MODELS
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
t = MODELS["flux"]; m = fusion_pass.optimize(t.build().cuda())
kw = {k: v.cuda() if torch.is_tensor(v) else v for k, v in t.inputs().items()}
with torch.no_grad():
    m(**kw)
fwd = m.transformer_blocks[0].__dict__["forward"]
cc = fwd.compiled
print("graphs compiled", len(cc.graph_reports))
print("entry code entries", len(_debug_get_cache_entry_list(cc.entry.__code__)))
print("forward code entries", len(_debug_get_cache_entry_list(type(m.transformer_blocks[0]).forward.__code__)))
import types
codes = [o for o in gc.get_objects() if isinstance(o, types.CodeType)] if False else []
# scan functions' code for cache entries
found = []
for o in gc.get_objects():
    if isinstance(o, types.FunctionType):
        try:
            n = len(_debug_get_cache_entry_list(o.__code__))
        except Exception:
            continue
        if n:
            found.append((o.__qualname__, o.__code__.co_filename[-60:], n))
print("functions with cache entries:", found[:20])
print(inspect.signature(_debug_get_cache_entry_list))
