"""Job handlers, one per message type."""
