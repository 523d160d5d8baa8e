"""Installed as metatrain.scripts (pyproject.toml). A regular package, as metatrain/ is:
an editable install finds a mapped subpackage of a regular package only by its
__init__.py."""
