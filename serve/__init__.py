"""Serving stage: an engine directory's images over HTTP — sdrt's own `/v1/images`, the web UI's `/sdapi/v1/*` and
the OpenAI-shaped `/v1/images/generations` — with dynamic batching, limits, Prometheus metrics and Ray Serve.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client; Ray Serve for ``--ray``). `sdrt.serve.cli` imports
only argparse, so the `sdrt` command lists `serve` on any install.
"""
