"""Methods: one file per published method, each registered with ``@register_method``.

Modules here are discovered automatically by :mod:`tbps.models.registry`; methods never import
each other, only the shared core (backbones, losses, attention blocks, re-rankers).
"""
