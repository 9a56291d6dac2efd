"""Command-line tools above the library: benchmarks, the step sweep, the cross-run report, the checkpoint importer.

Layering (one-way): ``tools`` may import ``core``, ``model_zoo``, ``data``, ``optim`` and ``dl_utils``; nothing in
those packages imports ``tools``. Each module is run as ``python -m tools.<name>``.
"""
