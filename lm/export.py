"""Export a trained model folder to other ecosystems.

``python -m lm.export --format hf --model_dir output/model --out output/hf``
    a Hugging Face GPT-2 folder (``GPT2LMHeadModel.from_pretrained(out)`` loads it; see ``lm.hf``).
``python -m lm.export --format gguf --outtype q8_0 --model_dir output/model --out model.gguf``
    a GGUF file for llama.cpp (``lm.gguf.export_gguf``).

Bad input ends in one ``error: ...`` line and exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys

from .cli import add_debug_flag, run_tool

FORMATS = ("hf", "gguf")
GGUF_OUTTYPES = ("f32", "f16", "q8_0", "q4_0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lm-export", description="Export a model folder to Hugging Face "
                                "GPT-2 (--format hf) or GGUF (--format gguf).")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--model_dir", default="output/model", help="folder written by lm.train (output_dir/model)")
    p.add_argument("--out", required=True, help="hf: a folder to create; gguf: the .gguf file to write")
    p.add_argument("--outtype", default="f32", choices=GGUF_OUTTYPES, help="gguf only: weight format")
    p.add_argument("--force", action="store_true", help="hf: write into an existing, non-empty folder")
    add_debug_flag(p)
    return p


def export(fmt: str, model_dir: str, out: str, outtype: str = "f32", force: bool = False) -> dict:
    """Run one export; ValueError (with a message for the user) when it cannot be done."""
    if fmt == "hf":
        from .hf import export_hf
        return export_hf(model_dir, out, force=force)
    if fmt == "gguf":
        try:
            from .gguf import export_gguf
        except ImportError as e:
            raise ValueError(f"the GGUF exporter is not installed in this copy of lm (lm.gguf could not be "
                             f"imported: {e}); use --format hf, or update to a version with lm/gguf.py") from None
        if os.path.isdir(out):
            raise ValueError(f"--out {out} is a folder: give the path of the .gguf file to write")
        return export_gguf(model_dir, out, outtype)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    if args.outtype != "f32" and args.format != "gguf":
        raise ValueError("--outtype is for --format gguf only")
    summary = export(args.format, args.model_dir, args.out, args.outtype, args.force)
    print(f"wrote {args.format} export to {args.out}")
    for k, v in (summary or {}).items():
        if k != "out":
            print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
