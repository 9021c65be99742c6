"""To and from Hugging Face: the Llama-named format, importing a checkpoint (no remote code is run), exporting
a trained one as safetensors with the remote-code files of ``remote/``."""
