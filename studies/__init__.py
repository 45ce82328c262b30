"""Studies and the demo: they use every package (training, export, serving, benchmarks) but are not part of
`freesolo bench`. `python -m studies.demo` is what `make demo` runs; `python -m studies.freesolo_report` rebuilds
docs/freesolo_results.md."""
