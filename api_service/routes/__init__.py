"""HTTP controllers: parse the request, call a handler, shape the response."""
