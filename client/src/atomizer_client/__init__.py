"""Thin client for atomizerd."""
