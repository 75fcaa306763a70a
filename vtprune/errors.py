"""Errors raised by vtprune. Every message names the fix."""


class VTPruneError(ValueError):
    """A bad argument or an input vtprune cannot handle; the message says what to do instead."""


class UnsupportedModelError(VTPruneError, TypeError):
    """The model (or its vision tower / language model) is not one vtprune knows how to patch."""


class UnsupportedSettingError(VTPruneError):
    """A generation or model setting the patch cannot honour (e.g. a compiled forward)."""
