"""The Litestar HTTP API: validation, publishing, search, listing, redirects, deletes."""
