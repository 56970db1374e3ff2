"""The pure domain: deciders (events, state, decide, evolve) with no I/O, clock or random ids."""
