"""What runs keep on disk: the feature store (features.py) and run directories (runs.py)."""
