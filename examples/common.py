"""What the examples share: the model-choosing arguments and building that model."""
from __future__ import annotations

import argparse

import torch
from torch import nn

from reference_models import CONFIGS, build_model, load_official

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_parser(description: str) -> argparse.ArgumentParser:
    """A parser with --config, --official, --device and --dtype."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=tuple(CONFIGS), help="model config (default: %(default)s)")
    parser.add_argument("--official", action="store_true", help="build the official hy3dgen file instead of ours")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="(default: %(default)s)")
    return parser


def build(args: argparse.Namespace) -> nn.Module:
    """The DiT the arguments name, random weights (seeded), in eval mode."""
    torch.manual_seed(0)
    builder = load_official if args.official else build_model
    return builder(args.config, device=torch.device(args.device), dtype=DTYPES[args.dtype]).eval()
