"""Servers for tests and benchmarks (a loopback judge): never a real judge."""
