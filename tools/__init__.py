"""Tools around the method: the VOC2007 download (download.py, `--download`) and the picture of
FedMPT's transport plans (explain.py, `--plot`)."""
