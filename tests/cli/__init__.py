"""The `sdrt` command (cli/) and the boundaries between the stages."""
