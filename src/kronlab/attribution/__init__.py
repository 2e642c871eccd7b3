"""Influence-function data attribution (placeholder until the influence issue lands)."""
