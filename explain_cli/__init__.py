"""explain-cli: batch SHAP explanations for PyTorch image classifiers."""

__version__ = "0.1.0"
