"""``torch-module``: any ``torch.nn.Module`` (a ``transformers`` or ``diffusers`` model, a timm
network, your own) trained, checkpointed, exported and checked by isthmus on the torch engine."""
