"""One loader per on-disk dataset layout (data.load_dataset picks one by name): voc.py (PASCAL
VOC2007, and the shapes world written in its layout), coco.py, nuswide.py, multiscene.py
(Multi-Scene-Clean), mlrsnet.py (with its seeded per-scene split), folder.py (your own
labels.csv). base.py holds what they share."""
