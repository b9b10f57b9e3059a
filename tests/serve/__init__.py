"""The HTTP server (serve/): `sdrt serve`, its batching, its APIs and real clients."""
