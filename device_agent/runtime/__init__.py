"""Running a decrypted model: the runners (ONNX Runtime, LiteRT), the sealed pre-processing, and
the shaping of outputs into the least a caller's role may see."""
