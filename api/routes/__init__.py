"""Route handlers, one module per resource."""

from api.routes import files, generate, health, images, jobs, search

ROUTES = [*health.ROUTES, *images.ROUTES, *search.ROUTES, *generate.ROUTES, *jobs.ROUTES, *files.ROUTES]
