"""Adapters to the outside world: settings, logging, object storage, RabbitMQ and Qdrant."""
