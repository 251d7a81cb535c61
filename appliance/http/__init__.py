"""The HTTP API: the app factory, one blueprint per area, and the service that serves it."""
