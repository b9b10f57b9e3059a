"""`sdrt bench`: sdrt's backends against eager diffusers on one device, with the FLOP lower bound beside them.

Installed as ``sdrt.benchmarks`` (from the top-level ``benchmarks/`` folder, whose ``results/`` holds committed
runs). Needs the ``bench`` extra: the export stage's diffusers for the baseline, and matplotlib for the chart.
"""
