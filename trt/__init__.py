"""The TensorRT stage: an engine directory's ONNX graphs -> TensorRT plans (`sdrt build`)."""
