"""Training the multitask network: model, losses, configuration, the training loop and its
state, checkpoints, and the scene helper network. Needs the ``train`` extra (torch)."""
