"""recmix's inference service: serves exported models over HTTP with onnxruntime, without torch."""
