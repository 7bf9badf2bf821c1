"""MODEL_PROFILE=tiny: small random-weight models of the real classes, built offline into MODEL_CACHE_DIR once, for
tests and smoke runs. One module per runner (`clip`, `diffusion`, `voice`), each with `MODEL_ID` (the name recorded
with outputs) and `ensure(cache_dir) -> Path` (the model's folder, built on first use)."""
