"""Inputs that provoke head behaviour, deterministic from a seed, each knowing its expected answer."""
