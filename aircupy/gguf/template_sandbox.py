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

import threading
import types
from string import Formatter

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import pass_context

from aircupy.gguf.template_checks import (Budget, BudgetExceeded, BudgetFormatter, budgeted_filter, check_method,
                                          check_percent, shallow_units, size_of)

__all__ = ["Budget", "BudgetExceeded", "BudgetSandbox"]


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

    def call(__self, __context, __obj, *args, **kwargs):   # jinja2's own signature and names
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
