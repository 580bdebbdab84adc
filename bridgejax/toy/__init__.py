"""The toy world (world.py: generated captioned shape images, VQA questions, dialogs) and its
tiny pretrained backbones (pretrain.py), written as a prepared dataset by prepare.py, so that
bridgejax builds, tests and demonstrates itself offline."""
