"""Request and response schemas of the REST API, per feature."""
