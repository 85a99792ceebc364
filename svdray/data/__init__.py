"""The data layer: manifests, decoding with decord, the Ray Data training stream, the latent
cache and the data ledger. It imports no model code."""
