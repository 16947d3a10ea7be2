"""asgd: asynchronous SGD on a parameter-server cluster for PyTorch."""

__version__ = "0.1.0"
