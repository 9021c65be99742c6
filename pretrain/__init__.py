"""The model, the MemDLM step and everything built on them, in floors (docs/DESIGN.md, "Layers"):
``config`` < ``model`` < ``memdlm`` < ``eval`` | ``hf`` < ``train``."""
