"""Adapters for the trainers people use, each a thin layer over :func:`bsmon.watch`.

``bsmon.integrations.transformers.BsmonCallback`` (Hugging Face ``Trainer``) and
``bsmon.integrations.lightning.BsmonCallback`` (Lightning). Each module imports its
framework, so import the one you use; ``import bsmon`` never loads them.
"""
