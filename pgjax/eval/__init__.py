"""Downstream evaluation: metrics with intervals, and the commands built on them."""
