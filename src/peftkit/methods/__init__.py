"""Methods: one file each. Importing this package registers every method."""

from . import dora, lora  # noqa: F401
