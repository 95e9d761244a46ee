"""One module per CLI command. Each imports only typer and the light modules at top level;
torch, onnx and onnxruntime are imported inside the command body."""
