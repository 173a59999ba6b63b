"""The model layer, below training and inference: the network (:mod:`.network`), the checkpoint
format (:mod:`.checkpoint`) and the fitted records it carries (:mod:`.records`). Training writes
it, inference reads it; neither imports the other. Needs the ``train`` extra (torch)."""
