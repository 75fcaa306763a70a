"""Every built-in method, one file each; importing this package registers them."""

from . import atp, fastv, flowcut, globalcom2, hired, mustdrop, none, pool, random, vtc_cls  # noqa: F401
from .base import ImageContext, Method, Selection  # noqa: F401
