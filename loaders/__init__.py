"""One loader per on-disk dataset layout (data.load_dataset picks one by name): voc.py (PASCAL
VOC2007, and the shapes world written in its layout), coco.py, nuswide.py, folder.py (your own
labels.csv). base.py holds what they share."""
