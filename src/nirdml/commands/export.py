"""``nirdml export``: write a checkpoint's embedding network as ONNX or TorchScript."""

from __future__ import annotations

import argparse

from nirdml.commands.argtypes import add_overwrite_option, positive_int

HELP = "export the embedding network of a checkpoint to ONNX or TorchScript"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file (e.g. best.pt)")
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                        help="onnx needs pip install 'nirdml[export]'")
    parser.add_argument("--out", required=True,
                        help="output file: .onnx for onnx, .pt, .pth or .ts for torchscript")
    add_overwrite_option(parser, "an export")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="input height/width (default: what the eval transform produces)")
    parser.add_argument("--opset", type=int, default=17,
                        help="ONNX opset, from 9 to the highest the installed torch's "
                             "TorchScript-based exporter writes (20 for torch 2.x)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the export with PyTorch on a random batch")


def run(args: argparse.Namespace) -> int:
    from nirdml.export import check_export_options, export_model, is_export_file
    from nirdml.files import check_output_file

    check_export_options(args.out, args.format, args.image_size, args.opset)
    check_output_file(args.out, "--out", lambda path: is_export_file(path, args.format),
                      args.overwrite)
    res = export_model(args.checkpoint, args.out, args.format, image_size=args.image_size,
                       opset=args.opset, check=not args.no_check)
    c, h, w = res.input_shape
    check = "" if res.max_abs_diff is None else f"; max |diff| vs PyTorch {res.max_abs_diff:.2e}"
    print(f"wrote {res.format} model to {res.path}: images (B, {c}, {h}, {w}) float32 -> "
          f"embeddings (B, {res.embedding_dim}){check}")
    return 0
