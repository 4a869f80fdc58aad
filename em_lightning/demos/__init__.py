"""Offline demo pieces (a demo judge whose scores mean nothing): never part of a measurement."""
