"""The offline world: generated multi-label images of coloured shapes written in the VOC layout
(world.py), the small CLIP pretrained on their captions (model.py, pretrain.py, weights/)."""
