"""Read models (projections) folded from the event log, and the queries over them."""
