"""Content: templates and rendering."""
