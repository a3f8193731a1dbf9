"""K-quant formats (256-value super-blocks): filled in next."""
from __future__ import annotations

FORMATS: dict = {}
