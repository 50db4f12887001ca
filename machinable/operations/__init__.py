"""Whole-catalog passes built on the layers below: each takes an ``Index``.

- ``reindex``: rebuild store availability by listing stores (local directories are
  reindexed by ``Index.reindex`` itself).
- ``verify``: compare the index with the record directories; repair what is safe.
- ``gc``: find what nothing needs; delete it only when asked.
- ``upstream``: import a storage written by machinable 5.x.
"""
