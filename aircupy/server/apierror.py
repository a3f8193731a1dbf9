"""The error a client sees: OpenAI's {"error": {message, type, param, code}} with an HTTP status.

Its own module so that every request parser (protocol.py, structured.py, tools.py) can raise it, and
read an optional typed field (opt_bool, opt_str), without importing the others.
"""
from __future__ import annotations


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if status >= 500 else
                             "authentication_error" if status == 401 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


def opt_bool(obj: dict, key: str, param: str | None = None) -> bool | None:
    """obj[key] when absent/None or a boolean, else a 400 naming `param` (default: key)."""
    v = obj.get(key)
    if v is None or isinstance(v, bool):
        return v
    raise bad(param or key, f"expected a boolean, got {type(v).__name__}", "invalid_type")


def opt_str(obj: dict, key: str, param: str | None = None) -> str | None:
    """obj[key] when absent/None or a string, else a 400 naming `param` (default: key)."""
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    raise bad(param or key, f"expected a string, got {type(v).__name__}", "invalid_type")
