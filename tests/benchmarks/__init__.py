"""The benchmarks (benchmarks/): `sdrt bench`, its peers, and the GPU check script."""
