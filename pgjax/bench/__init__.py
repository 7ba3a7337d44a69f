"""Benchmarks. Each writes one JSON record under benchmarks/results/ (see record.py)."""
