"""Hunyuan3D-2 shape DiT, written for fusion_pass from the published architecture.

A clean-room twin of the official `hy3dgen/shapegen/models/denoisers/hunyuan3ddit.py`
(`hy3dgen==2.0.2`, non-commercial licence, hence not vendored). It keeps what a graph pass sees:

- the same module tree, parameter names and construction order, so checkpoints load in either
  direction with `strict=True` and a shared seed gives the same random weights;
- the same operations in the same order under the same local names, so Dynamo and FX capture
  identical graphs, node names included;
- the same capture obstacles, kept on purpose: `torch.fx.symbolic_trace` fails on
  `Hunyuan3DDiT` (`if torch.is_floating_point(t)` on a proxy), on `Modulation` and the blocks
  holding it (`ModulationOut(*out[:3])` iterates a proxy) and on any `einops.rearrange` of a proxy.
  `LastLayer` traces.

Shapes: B batch, L tokens (La latents, Lc condition tokens), D = hidden_size, H heads,
Dh = D / H head width. There is no positional embedding: every `pe` argument is None and unused.
Forward signatures carry the official annotations (`pe: Tensor` included), which FX copies into
the graph.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

QKV_SPLIT = "B L (K H D) -> K B H L D"
"""Fused qkv projection [B, L, 3*H*Dh] -> stacked q, k, v of [B, H, L, Dh] each."""


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v over [B, H, L, Dh] inputs, heads merged: [B, L, H*Dh]."""
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [N, dim] of the times `t` [N]: `cat(cos(a), sin(a))` with
    `a = time_factor * t * max_period ** (-i / (dim // 2))`, computed in fp32, zero-padded to an odd
    `dim`, and cast to `t`'s dtype when `t` is floating point (the branch `symbolic_trace` fails on).
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(
        t.device
    )
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        embedding = embedding.to(t)
    return embedding


class GELU(nn.Module):
    """GELU (tanh approximation by default) of `x.contiguous()`."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x.contiguous(), approximate=self.approximate)


class MLPEmbedder(nn.Module):
    """out_layer(silu(in_layer(x))): [N, in_dim] -> [N, hidden_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """`(x / sqrt(mean(x**2, -1) + 1e-6)).to(x.dtype) * scale`, statistics in fp32.

    The product with `scale` [dim] happens in the input dtype (promoted with `scale`'s dtype).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor):
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    """Separate RMSNorms over the head width of q and k [B, H, L, Dh], both cast to `v`'s dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        q = self.query_norm(q)
        k = self.key_norm(k)
        return q.to(v), k.to(v)


class SelfAttention(nn.Module):
    """Holds one stream's qkv projection, q/k norm and output projection.

    The blocks call `qkv`, `norm` and `proj` directly; `forward` is the plain composition.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        qkv = self.qkv(x)
        q, k, v = rearrange(qkv, QKV_SPLIT, K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        x = attention(q, k, v)
        x = self.proj(x)
        return x


@dataclass
class ModulationOut:
    """adaLN parameters for one sub-layer, each [B, 1, D]: `(1 + scale) * norm(x) + shift`,
    then `x + gate * sublayer(...)`."""

    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """`lin(silu(vec))` [B, D] -> one or two `ModulationOut`s of [B, 1, D] tensors.

    The star-unpack of the chunks into `ModulationOut` is what stops `symbolic_trace`.
    """

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> Tuple[ModulationOut, Optional[ModulationOut]]:
        out = self.lin(F.silu(vec))[:, None, :]
        out = out.chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


class DoubleStreamBlock(nn.Module):
    """Latent (img) and condition (txt) streams with their own weights and one joint attention.

    Per stream: `h = (1 + m1.scale) * LN1(x) + m1.shift` -> qkv -> QKNorm; attention over the
    concatenation [txt; img] on L; `x = x + m1.gate * proj(attn)`;
    `x = x + m2.gate * mlp((1 + m2.scale) * LN2(x) + m2.shift)`. img [B, La, D], txt [B, Lc, D],
    vec [B, D].
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _affine_free_layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = _affine_free_layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _affine_free_layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = _affine_free_layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> Tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_modulated = self.img_norm1(img)
        img_modulated = (1 + img_mod1.scale) * img_modulated + img_mod1.shift
        img_qkv = self.img_attn.qkv(img_modulated)
        img_q, img_k, img_v = rearrange(img_qkv, QKV_SPLIT, K=3, H=self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)

        txt_modulated = self.txt_norm1(txt)
        txt_modulated = (1 + txt_mod1.scale) * txt_modulated + txt_mod1.shift
        txt_qkv = self.txt_attn.qkv(txt_modulated)
        txt_q, txt_k, txt_v = rearrange(txt_qkv, QKV_SPLIT, K=3, H=self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP block over the joint sequence x [B, Lc + La, D].

    `h = (1 + m.scale) * LN(x) + m.shift`; `linear1(h)` splits into qkv [.., 3D] and mlp
    [.., mlp_ratio*D]; `x + m.gate * linear2(cat(attention(QKNorm(q), QKNorm(k), v), gelu(mlp)))`.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _affine_free_layer_norm(hidden_size)
        self.mlp_act = GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, QKV_SPLIT, K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LastLayer(nn.Module):
    """`linear((1 + scale) * LN(x) + shift)` with `shift, scale = adaLN_modulation(vec).chunk(2)`
    (shift first): x [B, L, D], vec [B, D] -> [B, L, patch_size**2 * out_channels]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _affine_free_layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        x = self.linear(x)
        return x


class Hunyuan3DDiT(nn.Module):
    """Flow-matching denoiser: `forward(x, t, contexts, guidance=None)` -> velocity like x.

    x [B, La, in_channels] latents; t [B] times in [0, 1]; contexts["main"] [B, Lc, context_in_dim]
    condition tokens; `guidance` [B] is required when `guidance_embed` (turbo/fast variants).
    vec = time_in(emb(t)) (+ guidance_in(emb(guidance))) modulates every block; `depth` double
    blocks run on (latents, condition), then `depth_single_blocks` single blocks on [cond; latents],
    whose latent part goes through the final layer.

    As in the official model, `time_factor` is passed to `timestep_embedding` as its `max_period`,
    so the embedding uses period 1000 and the default `time_factor` 1000 scales t. The t embedding is
    cast to the weights' dtype, the guidance embedding is not: guidance must already have that dtype.
    """

    def __init__(
        self,
        in_channels: int = 64,
        context_in_dim: int = 1536,
        hidden_size: int = 1024,
        mlp_ratio: float = 4.0,
        num_heads: int = 16,
        depth: int = 16,
        depth_single_blocks: int = 32,
        axes_dim: Sequence[int] = (64,),
        theta: int = 10_000,
        qkv_bias: bool = True,
        time_factor: float = 1000,
        guidance_embed: bool = False,
        ckpt_path: Optional[str] = None,
    ):
        super().__init__()
        if ckpt_path is not None:
            raise NotImplementedError(
                "ckpt_path is not supported: the official loader rewrites key prefixes and loads "
                "non-strictly; load the checkpoint yourself and call load_state_dict(strict=True)"
            )
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if sum(axes_dim) != hidden_size // num_heads:
            raise ValueError(f"sum(axes_dim) of {list(axes_dim)} must equal the head width {hidden_size // num_heads}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.context_in_dim = context_in_dim
        self.hidden_size = hidden_size
        self.mlp_ratio = mlp_ratio
        self.num_heads = num_heads
        self.depth = depth
        self.depth_single_blocks = depth_single_blocks
        self.axes_dim = list(axes_dim)
        self.theta = theta
        self.qkv_bias = qkv_bias
        self.time_factor = time_factor
        self.guidance_embed = guidance_embed

        self.latent_in = nn.Linear(in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size)
        self.cond_in = nn.Linear(context_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size) if guidance_embed else nn.Identity()
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias) for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)

    def forward(self, x, t, contexts, **kwargs) -> Tensor:
        cond = contexts["main"]
        latent = self.latent_in(x)
        vec = self.time_in(timestep_embedding(t, 256, max_period=self.time_factor).to(dtype=latent.dtype))
        if self.guidance_embed:
            guidance = kwargs.get("guidance")
            if guidance is None:
                raise ValueError("guidance_embed models need a guidance strength: pass guidance=<tensor [B]>")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256, max_period=self.time_factor))
        cond = self.cond_in(cond)

        for block in self.double_blocks:
            latent, cond = block(img=latent, txt=cond, vec=vec, pe=None)
        latent = torch.cat((cond, latent), 1)
        for block in self.single_blocks:
            latent = block(latent, vec=vec, pe=None)
        latent = latent[:, cond.shape[1]:, ...]
        return self.final_layer(latent, vec)


def _affine_free_layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without weight or bias, eps 1e-6: every norm the modulations feed."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear, children named 0, 1, 2 as in the checkpoints."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim, bias=True),
        GELU(approximate="tanh"),
        nn.Linear(hidden_dim, dim, bias=True),
    )
