"""sdrt's tests, a folder per stage (export, trt, runtime, serve, benchmarks, cli) and the helpers they share
(tests/helpers). A package, so that modules of the same name in two stage folders do not clash and every test
imports its helpers as ``tests.helpers...`` (pytest puts the repository root on sys.path)."""
