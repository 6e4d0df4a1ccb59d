"""kubetune benchmarks: measurements (not timed tests). Run with `make bench` or `python -m bench [name ...]`."""
