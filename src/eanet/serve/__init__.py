"""`eanet serve`: a checkpoint over HTTP (app, batcher, decoding, request guard, server)."""
