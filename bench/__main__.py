"""``python -m bench --part all|pipeline|phone|server|embedder|dlib_chip|gallery|training|scaleout`` (``make bench``)."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.measure import environment
from bench.report import load_results, render_document, write_result

PARTS = ("pipeline", "phone", "server", "embedder", "dlib_chip", "gallery", "decisions", "training",
         "scaleout")
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--part", default="all", choices=("all", *PARTS))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: checks the code path, measures nothing worth keeping")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "facegate-bench",
                        help="scratch space (stand-in bundle, galleries, server logs)")
    parser.add_argument("--docs-only", action="store_true",
                        help="only regenerate the document from the results on disk")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    parts = () if args.docs_only else PARTS if args.part == "all" else (args.part,)
    mode = "smoke" if args.smoke else "full"
    command = "make bench PART=" + args.part if not args.smoke else (
        "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv))
    modules = {part: importlib.import_module(f"bench.{part}") for part in PARTS}
    for part in parts:
        print(f"bench: {part} ({mode} sizes)", flush=True)
        start = time.perf_counter()
        env = environment()
        result = modules[part].run(modules[part].SIZES[mode], args.workdir)
        elapsed = time.perf_counter() - start
        record = {"part": part, "mode": mode, "command": command, "elapsed_s": elapsed,
                  "environment": env, **result}
        path = write_result(args.results_dir, part, record)
        print(f"bench: {part} done in {elapsed:.0f} s -> {path}", flush=True)
    results = load_results(args.results_dir, PARTS)
    renderers = {part: modules[part].markdown for part in PARTS}
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(render_document(results, renderers))
    print(f"bench: wrote {args.docs}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
