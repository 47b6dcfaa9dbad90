"""The ``facegate`` command: one entry point, one sub-command per stage.

Each sub-command lives in the module that owns the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported lazily
so ``facegate detect`` does not import torch and ``facegate train`` does not
import FastAPI.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "detect": ("facegate.core.cli_detect", "detect faces in an image; print JSON, optionally draw them"),
    "align": ("facegate.core.cli_align", "detect the largest face and write its crop in a model's geometry"),
    "prepare": ("facegate.train.prepare", "detect + align photo folders into training crops (dlib chips or ArcFace template)"),
    "train": ("facegate.train.trainer", "train an embedding model from a config file"),
    "evaluate": ("facegate.train.evaluate", "evaluate a model bundle or checkpoint on pairs"),
    "calibrate": ("facegate.train.calibrate",
                  "learn a bundle's USS threshold on frozen embeddings of labelled crops"),
    "export": ("facegate.export.cli", "export a checkpoint to ONNX / TensorRT bundles"),
    "bundle": ("facegate.core.cli_bundle",
               "seal, sign and verify model bundles; generate Ed25519 signing keys"),
    "serve": ("facegate.server.cli", "run the HTTP server"),
    "keys": ("facegate.server.keys_cli", "create, list and revoke named API keys with scopes"),
    "gallery": ("facegate.gallery.cli",
                "gallery maintenance: `gallery reembed` moves kept crops to a new model bundle"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facegate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Only import the module of the command actually invoked.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
