"""pipeline: train a small dropout CNN, export it to ONNX, prove dropout is gone, quantize, measure.

This module holds the version only, so that `pipeline --help` never imports torch.
"""

__version__ = "0.1.0"
