"""Training the multitask network: losses, configuration, the time budget, the training loop and
its state, and the scene helper network (the network and its checkpoints: :mod:`geocell.model`).
Needs the ``train`` extra (torch)."""
