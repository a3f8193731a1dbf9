"""What each chat-template operation may build, checked before it runs (template_sandbox.py says why).

Budget: the units (characters, 8 per list item), steps and output one render may use. size_of: an
upper bound on the text a value turns into, walked within the budget. The check_* functions and
filter_check refuse, from the sizes of inputs and arguments, an operation that could build more than
what is left; the result is charged once it exists (the sandbox does that).
"""
from __future__ import annotations

import re

from jinja2.runtime import Undefined
from jinja2.sandbox import SandboxedFormatter, SecurityError
from jinja2.utils import Namespace, _PassArg, pass_context

BASE_UNITS = 2 << 20          # characters a render may build besides what its input accounts for
UNITS_PER_INPUT_CHAR = 16     # templates copy each message a few times (+ chains, trim, output)
BASE_STEPS = 100_000          # loop iterations, calls and filter uses
STEPS_PER_MESSAGE = 200
BASE_OUTPUT = 256 << 10       # characters of rendered prompt besides twice the input
OUTPUT_PER_MESSAGE = 512
ITEM_UNITS = 8                # a list item is a pointer


class BudgetExceeded(SecurityError):
    """A render asked for more memory or work than its budget allows."""


class Budget:
    def __init__(self, units: int, steps: int, output: int):
        self.units, self.steps, self.output = units, steps, output

    @classmethod
    def for_input(cls, input_chars: int, n_messages: int) -> "Budget":
        return cls(BASE_UNITS + UNITS_PER_INPUT_CHAR * input_chars, BASE_STEPS + STEPS_PER_MESSAGE * n_messages,
                   BASE_OUTPUT + 2 * input_chars + OUTPUT_PER_MESSAGE * n_messages)

    def check(self, n: int, what: str = "a value") -> None:
        """Refuse, before the work, to build something of up to n units when they are not left."""
        if n > self.units:
            raise BudgetExceeded(f"{what} of up to {n:,} characters exceeds what is left of the render's "
                                 f"budget ({self.units:,})")

    def alloc(self, n: int, what: str = "a value") -> None:
        """Charge n units (checked first)."""
        self.check(n, what)
        self.units -= n

    def step(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise BudgetExceeded("the template did too much work (loop iterations, calls and filters)")

    def emit(self, n: int) -> None:
        self.output -= n
        if self.output < 0:
            raise BudgetExceeded("the rendered prompt is longer than the render's output budget")


def shallow_units(v) -> int:
    """Units a freshly built value takes (its own storage, not what it refers to)."""
    if isinstance(v, (str, bytes, bytearray)):
        return len(v)
    if isinstance(v, (list, tuple, dict, set, frozenset)):
        return ITEM_UNITS * len(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return v.bit_length() // 8
    return 0


def size_of(obj, budget: Budget, indent: int = 0, sep: int = 2) -> int:
    """An upper bound on len(str(obj)) and of its JSON (with `indent` and `sep` characters between
    items), walking containers; shared references count each time. Each node visited is a step, and
    the walk stops as soon as the size exceeds the units left (the caller then refuses)."""
    total, stack = 0, [(obj, 0, True)]
    while stack:
        o, depth, top = stack.pop()
        budget.step()
        if isinstance(o, str):
            total += len(o) if top else 12 * len(o) + 2   # repr/JSON escapes: \U0001f600 is 10, \ud83d\ude00 12
        elif isinstance(o, (bytes, bytearray)):
            total += 4 * len(o) + 3
        elif isinstance(o, bool) or o is None:
            total += 5
        elif isinstance(o, int):
            total += o.bit_length() * 3 // 10 + 2
        elif isinstance(o, float):
            total += 24
        elif isinstance(o, (list, tuple, set, frozenset, dict, Namespace)):
            items = object.__getattribute__(o, "_Namespace__attrs") if isinstance(o, Namespace) else o
            total += 16 + (len(items) * (sep + 2 + indent * (depth + 1)))
            if isinstance(items, dict):
                stack.extend((k, depth + 1, False) for k in items)
                stack.extend((v, depth + 1, False) for v in items.values())
            else:
                stack.extend((v, depth + 1, False) for v in items)
        elif isinstance(o, Undefined):
            total += 0
        else:
            total += 80   # macros, loop objects, generators, ranges: a short repr
        if total > budget.units:
            return total
    return total


# ---- `%` and str.format: widths and precisions are checked before the string is built ----
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)
_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?")


def check_percent(budget: Budget, fmt: str, args) -> None:
    """`fmt % args`: every width and precision is counted, each conversion may print the largest arg."""
    pads = specs = 0
    for m in _PERCENT.finditer(fmt):
        width, precision, kind = m.groups()
        if "*" in (width, precision):
            raise BudgetExceeded("'*' widths are not allowed in % formatting")
        pads += int(width or 0) + int(precision or 0)
        specs += kind != "%"
        if pads > budget.units:
            break
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    largest = max((size_of(v, budget) for v in values), default=0)
    budget.check(len(fmt) + pads + specs * largest, "% formatting")


class BudgetFormatter(SandboxedFormatter):
    """str.format / format_map: each field's width and value are charged before it is formatted."""

    def __init__(self, env, budget_of):
        super().__init__(env)
        self._budget_of = budget_of

    def format_field(self, value, format_spec: str):
        m = _SPEC.match(format_spec)
        pad = int(m.group(1) or 0) + int(m.group(2) or 0) if m else 0
        b = self._budget_of()
        b.check(pad + size_of(value, b), "a format field")
        out = super().format_field(value, format_spec)
        b.alloc(len(out), "a format field")
        return out


def _items_of(value) -> list:
    return value if isinstance(value, list) else list(value)


def check_join(budget: Budget, sep, items: list) -> None:
    n = sum(len(x) if isinstance(x, (str, bytes)) else size_of(x, budget) for x in items)
    budget.check(n + len(sep) * max(len(items) - 1, 0), "join")


def _replace_bound(s, old, new, count) -> int:
    n = len(s) + 1 if count is None or count < 0 else count
    return len(s) + n * max(0, len(new) - len(old))


def check_method(budget: Budget, owner, name: str, args: tuple, kwargs: dict) -> tuple:
    """Before a str/bytes/int method runs: refuse what it may build beyond the budget (the call then
    charges its actual result); returns args, join's iterable materialised to be counted."""
    a = list(args)

    def arg(i, key, default=None):
        return a[i] if len(a) > i else kwargs.get(key, default)

    n = len(owner) if isinstance(owner, (str, bytes)) else 0
    if name in ("ljust", "rjust", "center", "zfill"):
        budget.check(max(n, _int(arg(0, "width", 0))), name)
    elif name == "expandtabs":
        budget.check(n + owner.count("\t" if isinstance(owner, str) else b"\t") * max(_int(arg(0, "tabsize", 8)), 1),
                     name)
    elif name == "replace":
        budget.check(_replace_bound(owner, arg(0, "old", ""), arg(1, "new", ""), arg(2, "count", -1)), name)
    elif name == "join" and a:
        a[0] = _items_of(a[0])
        check_join(budget, owner, a[0])
    elif name == "translate":
        table = arg(0, "table", {})
        widest = max((len(v) for v in table.values() if isinstance(v, (str, bytes))), default=1) \
            if isinstance(table, dict) else 1
        budget.check(n * max(widest, 1), name)
    elif name in ("to_bytes",):
        budget.check(_int(arg(0, "length", 1)), name)
    elif name in ("hex",) and isinstance(owner, (bytes, bytearray)):
        budget.check(n * (2 + len(arg(0, "sep", "") or "")), name)
    elif isinstance(owner, (str, bytes)):
        budget.check(4 * n + 16, name)   # case maps, encode/decode, splits: at most a few times the input
    return tuple(a)


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        return 0   # not an int: the method itself raises a TypeError
    return v


# ---- filters: the ones that can build large values are checked from their arguments ----
def filter_check(name: str, budget: Budget, value, args: list, kwargs: dict):
    def arg(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name == "center":
        budget.check(max(size_of(value, budget), _int(arg(0, "width", 80))), name)
    elif name == "indent":
        w = arg(0, "width", 4)
        w = len(w) if isinstance(w, str) else _int(w)
        s = str(value) if isinstance(value, str) else ""
        budget.check(len(s) + (s.count("\n") + 1) * w, name)
    elif name == "format":
        check_percent(budget, str(value), tuple(args) if args else kwargs)
    elif name == "join":
        value = _items_of(value)
        check_join(budget, str(arg(0, "d", "")), value)
    elif name == "replace":
        budget.check(_replace_bound(str(value), str(arg(0, "old", "")), str(arg(1, "new", "")), arg(2, "count")), name)
    elif name in ("batch", "slice"):
        budget.check(ITEM_UNITS * _int(arg(0, "linecount" if name == "batch" else "slices", 1)), name)
    elif name == "tojson":
        indent = _int(arg(0, "indent", 0) or 0)
        seps = kwargs.get("separators") or ()
        sep = sum(len(s) for s in seps if isinstance(s, str)) if isinstance(seps, (list, tuple)) else 2
        budget.check(size_of(value, budget, indent=indent, sep=sep + 2), name)
    elif name in ("string", "pprint", "list", "e", "escape", "forceescape", "urlencode", "xmlattr", "upper",
                  "lower", "title", "capitalize", "wordwrap", "truncate"):
        factor = 12 if name in ("urlencode", "xmlattr") else 6 if name in ("e", "escape", "forceescape") else 3
        extra = len(str(arg(2, "wrapstring", "") or "")) if name == "wordwrap" else 0
        budget.check(factor * size_of(value, budget) * (1 + extra) + 16, name)
    elif name in ("striptags", "urlize"):
        if size_of(value, budget) > 65536:   # their regular expressions can take quadratic time
            raise BudgetExceeded(f"the {name} filter is limited to 64 KiB of text")
    elif name == "sum":
        value = _items_of(value)
        if any(isinstance(x, (str, bytes, list, tuple, dict)) for x in value):
            raise BudgetExceeded("the sum filter adds numbers only (summing sequences takes quadratic time)")
    return value


def budgeted_filter(env, name: str, fn):
    """`fn` wrapped to count a step, check its arguments and charge its result. pass_context also
    stops jinja2 from running it at compile time on constants, where no budget exists."""
    kind = _PassArg.from_obj(fn)

    @pass_context
    def wrapper(context, value, *args, **kwargs):
        b = env.budget()
        b.step()
        value = filter_check(name, b, value, list(args), kwargs)
        first = {_PassArg.context: (context,), _PassArg.eval_context: (context.eval_ctx,),
                 _PassArg.environment: (env,)}.get(kind, ())
        result = fn(*first, value, *args, **kwargs)
        b.alloc(shallow_units(result), f"the {name} filter's result")
        return result
    return wrapper
