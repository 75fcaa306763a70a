"""Every built-in method, one file each; importing this package registers them."""

from . import flowcut, globalcom2, hired, none, pool, random, vtc_cls  # noqa: F401
from .base import ImageContext, Method, Selection  # noqa: F401
