"""The export stage (export/): checkpoint -> verified ONNX engine directory, its files and commands."""
