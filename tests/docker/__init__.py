"""Tests of the docker backend against a real Docker engine."""
