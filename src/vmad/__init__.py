"""vmad: VMAD (Visual-enhanced Multimodal LLM Anomaly Detection) and its baselines."""

__version__ = "0.1.0"
