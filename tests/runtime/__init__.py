"""The runtime (runtime/): an engine directory -> images, against diffusers on the same models."""
