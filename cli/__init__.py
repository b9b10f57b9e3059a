"""The `sdrt` command (`python -m sdrt.cli`): a thin dispatcher over the stages. Each stage owns its subcommands
in its own `cli` module, which imports only argparse; the stage itself (and its extra dependencies) is imported
when one of its commands runs, so `sdrt --help` is instant and a runtime-only install names the missing extra in
one line."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from sdrt.runtime.errors import SdrtError

# in the order of the flow: checkpoint -> ONNX -> engines -> image -> benchmark -> served image
STAGE_COMMANDS = ("sdrt.export.cli", "sdrt.trt.cli", "sdrt.runtime.generate", "sdrt.benchmarks.cli", "sdrt.serve.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrt", description="Stable Diffusion as verified ONNX graphs and fp16 TensorRT engines."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in STAGE_COMMANDS:
        import_module(module).add_parsers(sub)
    return parser


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"sdrt: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = logging.getLogger("sdrt")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except SdrtError as err:
        print(f"sdrt: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
