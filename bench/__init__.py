"""Reproducible benchmarks of facegate against peers measured in the same run (`make bench`).

Each part (pipeline, server, embedder, gallery, training) is a module with a
``run(sizes) -> dict`` that measures, and a ``markdown(result) -> str`` that turns the
result into the tables of docs/benchmarks.md. ``python -m bench --part NAME`` runs a
part, writes ``bench/results/NAME.json`` and regenerates the document.
"""
