"""Raw clips -> manifests -> WebDataset shards -> streamed, decoded, augmented batches."""
