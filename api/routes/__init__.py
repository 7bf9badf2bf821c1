"""Route handlers, one module per resource."""

from api.routes import files, health, images, search

ROUTES = [*health.ROUTES, *images.ROUTES, *search.ROUTES, *files.ROUTES]
