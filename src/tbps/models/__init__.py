"""Model core: the method interface, the registry and backbone factories."""

from tbps.models.base import Features, PersonSearchMethod, index_features
from tbps.models.registry import create_method, get_method_class, list_methods, register_method

__all__ = [
    "Features",
    "PersonSearchMethod",
    "create_method",
    "get_method_class",
    "index_features",
    "list_methods",
    "register_method",
]
