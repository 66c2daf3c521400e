"""``timm.models``: only the ``layers`` subpackage."""
