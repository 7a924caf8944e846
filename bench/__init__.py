"""Benchmark tools for rtc: baseline servers, the load generator and a locustfile.

Not part of the shipped package (``setup.cfg`` only packages ``rtc``); run from the
repository root, e.g. ``python -m bench.loadgen fanout --url ws://127.0.0.1:8081``.
"""
