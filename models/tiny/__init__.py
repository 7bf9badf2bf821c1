"""MODEL_PROFILE=tiny: small random-weight models of the real classes, built offline into MODEL_CACHE_DIR once, for
tests and smoke runs (one module per runner)."""
