"""A jinja2 sandbox for untrusted chat templates that bounds the size and the work of a render.

jinja2's ImmutableSandboxedEnvironment keeps a template away from Python internals but not from memory
or time: `'a'.ljust(3000000000)`, `'%0100000000d' % 1`, a string doubled 40 times in a namespace, or
three nested loops over the messages. Here every render runs against a Budget (one per render, kept
per thread on the environment, so concurrent renders do not share it):

  * units: characters (and 8 per list item) that operations may build. Everything that can make a
    large value is checked *before* it runs, from the sizes of its inputs and arguments: `+`, `*`,
    `**` and `%`, `~` (concatenation, through the code generator), string and bytes methods with a
    width, count or separator (ljust, zfill, replace, join, format, translate, ...), int.to_bytes, the
    filters that pad, repeat or serialise (center, indent, format, join, replace, batch, tojson, ...),
    and the text of every `{{ }}` and of the template's own text each time it is output (so a loop
    cannot multiply a constant). Results are charged when they exist. Shared references are walked
    by size_of, so `[s] * 1000` printed is counted as 1000 copies of s.
  * steps: loop iterations (each `for` iterates through a counting filter), calls (macros included,
    so recursion is bounded) and filter applications.
  * output: characters the render may return.
A render that exceeds one raises BudgetExceeded (a jinja2 SecurityError). The budget grows with the
input (the messages), so a long conversation renders, while a small one bounds a hostile template to a
few MB and a fraction of a second.
"""
from __future__ import annotations

import re
import threading
import types
from string import Formatter

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError
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
                stack.extend((k, depth + 1, False) for k in items.keys())
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
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
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
def _filter_check(name: str, budget: Budget, value, args: list, kwargs: dict):
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
        value = _filter_check(name, b, value, list(args), kwargs)
        first = {_PassArg.context: (context,), _PassArg.eval_context: (context.eval_ctx,),
                 _PassArg.environment: (env,)}.get(kind, ())
        result = fn(*first, value, *args, **kwargs)
        b.alloc(shallow_units(result), f"the {name} filter's result")
        return result
    return wrapper


class BudgetCodeGenerator(CodeGenerator):
    """jinja2's compiler with three hooks into the budget: loops iterate through the counting filter
    `aircupy_iter`, `~` checks its operands' sizes first, and each output of template text is charged."""

    def visit_Template(self, node, frame=None):
        # Before the compiler collects the filter names the template uses.
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "aircupy_iter", [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile:
            func_name = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            func_name = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"{func_name}(environment.aircupy_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")

    def visit_Output(self, node, frame):
        n = sum(len(child.data) for child in node.nodes if isinstance(child, nodes.TemplateData))
        if n:
            self.writeline(f"environment.aircupy_output({n})")
        super().visit_Output(node, frame)


class BudgetSandbox(ImmutableSandboxedEnvironment):
    """The sandbox with a per-render budget; set it with `with env.budgeted(budget):` around a render."""

    code_generator_class = BudgetCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, **options):
        super().__init__(finalize=self._finalize, **options)
        self._local = threading.local()
        self.globals.pop("lipsum", None)   # lipsum(n=10**9) builds gigabytes; no chat template uses it
        self.filters["aircupy_iter"] = _counting_iter(self)

    def wrap_filters(self) -> None:
        """Call once every filter is registered (the environment's own and the template's extras)."""
        for name, fn in list(self.filters.items()):
            if name != "aircupy_iter":
                self.filters[name] = budgeted_filter(self, name, fn)

    def budget(self) -> Budget:
        b = getattr(self._local, "budget", None)
        if b is None:
            raise SecurityError("the template ran outside a budgeted render")
        return b

    def budgeted(self, budget: Budget):
        env = self

        class _Scope:
            def __enter__(self):
                env._local.budget = budget
                return budget

            def __exit__(self, *exc):
                env._local.budget = None
        return _Scope()

    # -- hooks jinja2 calls from compiled templates --
    def aircupy_concat(self, items: tuple) -> tuple:
        b = self.budget()
        sizes = [len(x) if isinstance(x, str) else size_of(x, b) for x in items]
        b.alloc(sum(sizes), "concatenation")
        return items

    def aircupy_output(self, n: int) -> None:
        self.budget().alloc(n, "template text")

    @pass_context
    def _finalize(self, context, value):
        b = getattr(self._local, "budget", None)
        if b is not None and not isinstance(value, str):
            b.check(size_of(value, b), "an output")
            value = str(value)
        if b is not None:
            b.alloc(len(value), "an output")
        return value

    def call_binop(self, context, operator, left, right):
        b = self.budget()
        if operator == "%" and isinstance(left, (str, bytes)):
            check_percent(b, left if isinstance(left, str) else left.decode("latin-1"), right)
            result = super().call_binop(context, operator, left, right)
            b.alloc(shallow_units(result), "% formatting")
            return result
        if operator == "+" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, type(left)):
            b.alloc(shallow_units(left) + shallow_units(right), "concatenation")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    b.alloc(shallow_units(seq) * max(n, 0), "repetition")
            if isinstance(left, int) and isinstance(right, int):
                b.alloc((abs(left).bit_length() + abs(right).bit_length()) // 8, "a product")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            b.alloc(abs(left).bit_length() * right // 8, "a power")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        b = __self.budget()
        b.step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(owner, (str, bytes, bytearray, int)):
            args = check_method(b, owner, __obj.__name__, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        b.alloc(shallow_units(result), "a call's result")
        return result

    def getitem(self, obj, argument):
        value = super().getitem(obj, argument)
        if isinstance(argument, slice):
            self.budget().alloc(shallow_units(value), "a slice")
        return value

    def wrap_str_format(self, value):
        """str.format / format_map through BudgetFormatter (jinja2's wrapper, with checked fields)."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"
        formatter = BudgetFormatter(self, self.budget)

        def wrapper(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return Formatter.vformat(formatter, fmt, args, kwargs)
        return wrapper


def _counting_iter(env: BudgetSandbox):
    @pass_context
    def aircupy_iter(context, iterable):
        b = env.budget()
        for item in iterable:
            b.step()
            yield item
    return aircupy_iter
