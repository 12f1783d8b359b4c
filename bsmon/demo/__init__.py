"""The built-in demo job used by ``bsmon demo``."""
