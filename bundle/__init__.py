"""Model bundles: the offline compiler and the format the engine loads.

`convert` plans a Hugging Face checkpoint (`import_hf`) or a GGUF file (`import_gguf`) into tensors
of a weight format (`quant`), with its tokenizer (`hf_tokenizer`, `gguf_tokenizer`) and architecture
(`spec`); `format` writes and reads the bundle file, `crypto` encrypts it (AES-256-GCM), `loader`
maps it into memory for the engine.
"""
