"""Tiny random configs of ten diffusers transformers (diffusers 0.42.1), shared by the tests.

``tiny_models()`` returns one :class:`TinyModel` per class: ``build()`` makes the model (seeded,
fp32, eval mode, well under a second), ``inputs()`` the keyword inputs of one call
(``return_dict=False``), ``optional()`` extra keyword inputs a user may pass on some calls only
(masks, guidance, controlnet residuals, attention kwargs), and ``blocks`` the dotted paths of
the ``ModuleList``s holding its transformer blocks, whose lengths come from the config
(``num_layers``, ``num_single_layers``, ``num_refiner_layers``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

B = 1  # batch
TXT = 6  # text tokens
D_TXT = 16  # text embedding width


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    optional: Callable[[], dict]
    blocks: tuple[str, ...]

    def block_count(self, model: torch.nn.Module) -> int:
        """Blocks the config asks for: the lengths of the block lists (``num_layers`` etc.)."""
        return sum(len(model.get_submodule(path)) for path in self.blocks)


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()

    return build


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text():
    return _randn(B, TXT, D_TXT, seed=2)


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=D_TXT, pooled_projection_dim=8,
                                  guidance_embeds=True, axes_dims_rope=(4, 4, 8))


def _flux_inputs():
    return dict(hidden_states=_randn(B, 16, 4, seed=1), encoder_hidden_states=_text(),
                pooled_projections=_randn(B, 8, seed=3), timestep=torch.tensor([0.5]), img_ids=_randn(16, 3, seed=4),
                txt_ids=torch.zeros(TXT, 3), guidance=torch.tensor([3.5]), return_dict=False)


def _flux_optional():
    return dict(joint_attention_kwargs={}, controlnet_block_samples=[_randn(B, 16, 32, seed=5)] * 2,
                controlnet_single_block_samples=[_randn(B, 16, 32, seed=6)] * 2)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=D_TXT, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)


def _sd3_inputs():
    return dict(hidden_states=_randn(B, 4, 8, 8, seed=1), encoder_hidden_states=_text(),
                pooled_projections=_randn(B, 8, seed=3), timestep=torch.tensor([500]), return_dict=False)


def _sd3_optional():
    return dict(block_controlnet_hidden_states=[_randn(B, 16, 16, seed=5)], joint_attention_kwargs={})


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=D_TXT, freq_dim=16, ffn_dim=32, num_layers=2,
                                 rope_max_seq_len=32)


def _wan_inputs():
    return dict(hidden_states=_randn(B, 4, 2, 8, 8, seed=1), timestep=torch.tensor([500]), encoder_hidden_states=_text(),
                return_dict=False)


def _wan_optional():
    return dict(attention_kwargs={})


def _hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, guidance_embeds=True, text_embed_dim=D_TXT,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def _hunyuan_video_inputs():
    return dict(hidden_states=_randn(B, 4, 1, 4, 4, seed=1), timestep=torch.tensor([500]), encoder_hidden_states=_text(),
                encoder_attention_mask=torch.ones(B, TXT), pooled_projections=_randn(B, 8, seed=3),
                guidance=torch.tensor([3500.0]), return_dict=False)


def _hunyuan_video_optional():
    return dict(attention_kwargs={})


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=D_TXT, num_layers=2, sample_width=8,
                                       sample_height=8, sample_frames=1, patch_size=2, max_text_seq_length=TXT)


def _cogvideox_inputs():
    return dict(hidden_states=_randn(B, 1, 4, 8, 8, seed=1), encoder_hidden_states=_text(),
                timestep=torch.tensor([500]), return_dict=False)


def _cogvideox_optional():
    return dict(attention_kwargs={})


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
                                      attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=D_TXT)


def _ltx_inputs():
    return dict(hidden_states=_randn(B, 2 * 4 * 4, 4, seed=1), encoder_hidden_states=_text(),
                timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(B, TXT), num_frames=2, height=4,
                width=4, return_dict=False)


def _ltx_optional():
    return dict(attention_kwargs={}, rope_interpolation_scale=(1.0, 1.0, 1.0))


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=D_TXT, sample_size=8, patch_size=1)


def _sana_inputs():
    return dict(hidden_states=_randn(B, 4, 8, 8, seed=1), encoder_hidden_states=_text(), timestep=torch.tensor([500]),
                return_dict=False)


def _sana_optional():
    mask = torch.ones(B, TXT)
    mask[:, -2:] = 0
    return dict(encoder_attention_mask=mask, attention_kwargs={},
                controlnet_block_samples=tuple(_randn(B, 64, 16, seed=5 + i) for i in range(2)))


def _pixart():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                    caption_channels=D_TXT)


def _pixart_inputs():
    return dict(hidden_states=_randn(B, 4, 8, 8, seed=1), encoder_hidden_states=_text(), timestep=torch.tensor([500]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def _pixart_optional():
    mask = torch.ones(B, TXT)
    mask[:, -2:] = 0
    return dict(encoder_attention_mask=mask, cross_attention_kwargs={})


def _qwen_image():
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=D_TXT, axes_dims_rope=(4, 6, 6))


def _qwen_image_inputs():
    return dict(hidden_states=_randn(B, 16, 16, seed=1), encoder_hidden_states=_text(),
                encoder_hidden_states_mask=torch.ones(B, TXT), timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)],
                return_dict=False)


def _qwen_image_optional():
    return dict(attention_kwargs={}, controlnet_block_samples=[_randn(B, 16, 32, seed=5)] * 2)


def _dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def _dit_inputs():
    return dict(hidden_states=_randn(B, 4, 8, 8, seed=1), timestep=torch.tensor([500]),
                class_labels=torch.tensor([3]), return_dict=False)


def _dit_optional():
    return dict(cross_attention_kwargs={})


def tiny_models() -> list[TinyModel]:
    return [
        TinyModel("flux", _seeded(_flux), _flux_inputs, _flux_optional, ("transformer_blocks", "single_transformer_blocks")),
        TinyModel("sd3", _seeded(_sd3), _sd3_inputs, _sd3_optional, ("transformer_blocks",)),
        TinyModel("wan", _seeded(_wan), _wan_inputs, _wan_optional, ("blocks",)),
        TinyModel("hunyuan_video", _seeded(_hunyuan_video), _hunyuan_video_inputs, _hunyuan_video_optional,
                  ("transformer_blocks", "single_transformer_blocks", "context_embedder.token_refiner.refiner_blocks")),
        TinyModel("cogvideox", _seeded(_cogvideox), _cogvideox_inputs, _cogvideox_optional, ("transformer_blocks",)),
        TinyModel("ltx_video", _seeded(_ltx), _ltx_inputs, _ltx_optional, ("transformer_blocks",)),
        TinyModel("sana", _seeded(_sana), _sana_inputs, _sana_optional, ("transformer_blocks",)),
        TinyModel("pixart", _seeded(_pixart), _pixart_inputs, _pixart_optional, ("transformer_blocks",)),
        TinyModel("qwen_image", _seeded(_qwen_image), _qwen_image_inputs, _qwen_image_optional, ("transformer_blocks",)),
        TinyModel("dit", _seeded(_dit), _dit_inputs, _dit_optional, ("transformer_blocks",)),
    ]
