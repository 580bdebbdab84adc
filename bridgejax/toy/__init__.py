"""The toy world (world.py: generated captioned shape images, VQA questions, dialogs) and its
tiny pretrained backbones, so that bridgejax builds, tests and demonstrates itself offline."""
