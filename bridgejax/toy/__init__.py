"""The toy world (world.py: generated captioned shape images, VQA questions, dialogs, from scene.py,
words.py and questions.py) and its tiny pretrained backbones (pretrain.py), written as a prepared
dataset by prepare.py, so that bridgejax builds, tests and demonstrates itself offline."""
