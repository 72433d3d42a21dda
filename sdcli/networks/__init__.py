"""Extra networks, as AUTOMATIC1111 calls them: LoRAs (and LyCORIS) merged into the weights, and textual-inversion
embeddings spliced into the prompt's token embeddings."""
