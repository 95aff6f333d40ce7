"""edgewatch trainer: fits the VAE on normal history, calibrates the threshold, exports the bundle.

Heavy and offline (PyTorch, onnx, litert-torch). It reuses the agent's manifest, windowing
and scoring code so offline numbers are the gateway's numbers.
"""
__version__ = "0.1.0"
