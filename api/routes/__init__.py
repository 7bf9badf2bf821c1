"""Route handlers, one module per resource."""

from api.routes import files, generate, health, images, jobs, metrics, page, search, voice

# health checks and signed file links: open even when API keys are configured
OPEN_ROUTES = [*health.ROUTES, *files.ROUTES]
ROUTES = [
    *images.ROUTES,
    *search.ROUTES,
    *generate.ROUTES,
    voice.generate_voice_to_r2,
    *jobs.ROUTES,
    *metrics.ROUTES,
]
# the web page and its assets: open, not in the OpenAPI document
PAGE_ROUTES = page.ROUTES
# multipart voice uploads, mounted with their own body-size limit (VOICE_MAX_REF_BYTES)
VOICE_UPLOAD_ROUTES = [voice.generate_voice]
