"""geocell.train: datasets, loaders, the multitask model, training, evaluation and prediction.

Needs the ``train`` extra (torch, torchvision, Pillow, ...).
"""
