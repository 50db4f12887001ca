"""Whole-catalog passes built on the layers below: verify, gc, import."""
