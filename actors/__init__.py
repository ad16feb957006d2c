"""Actors: one file per actor, named after what it owns."""
