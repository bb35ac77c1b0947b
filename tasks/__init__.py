"""radflow pipeline stages: one module per stage, plain typed functions plus thin @task wrappers."""

__version__ = "0.1.0"
