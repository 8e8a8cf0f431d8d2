"""tbps: text-based person search.

Public entry points::

    import tbps
    tbps.list_methods()                      # registered methods
    model = tbps.create_method("baseline", cfg, num_classes=...)
    tbps.evaluation.rank(similarity, query_ids, gallery_ids)
"""

__version__ = "0.1.0"

from tbps.models.registry import create_method, list_methods, register_method  # noqa: E402

__all__ = ["__version__", "create_method", "list_methods", "register_method"]
