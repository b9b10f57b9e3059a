"""The TensorRT build (trt/): ONNX graphs -> TensorRT plans, `sdrt build`."""
