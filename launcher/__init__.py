"""Starting and stopping the Flower processes of a run (flower.py, processes.py)."""
