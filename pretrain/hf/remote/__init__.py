"""Files copied verbatim into every ``memdlm-export-hf`` directory, for ``trust_remote_code=True``.

They import only torch and transformers (never this project), so an export works anywhere
transformers does.
"""
