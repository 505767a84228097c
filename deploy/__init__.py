"""Models outside training: MXNet symbol files, ONNX (fp32 and int8) and the model card."""
