"""`make bench`: captioning throughput and latency on this machine (`python -m bench`).

Not a test: it measures, prints a table and writes `bench/RESULTS.md`. See `__main__`.
"""
