"""Developer tools: data preparation and benchmarks, run as `python -m dev.<name>`."""
