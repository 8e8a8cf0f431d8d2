"""Search application: a gallery index over any registered method, and the text search on it."""

from tbps.search.searcher import Hit, Searcher

__all__ = ["Hit", "Searcher"]
