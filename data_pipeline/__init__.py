"""Text in, masked batches out: documents, tokenizer, packing, shard writers with their manifest, streaming
readers, masks built in loader workers from (seed, sample index), the resumable loader. Knows no model."""
