"""MemDLM's bi-level step: the MDLM and inner-loss weights, the step's public stages (inner update, anchor
loss, inference-time adaptation) and their pipeline-stage form."""
