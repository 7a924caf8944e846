"""Which metrics a PromQL expression reads, without a Prometheus server.

Dashboards and alert rules must only name metrics rtc exposes. ``metric_names``
tokenises an expression (strings, durations, label matchers and label lists are
told apart from metric names) and returns the metric names it selects; whether
the expression is valid PromQL is promtool's job (tests feed every expression
to ``promtool check rules`` as well). ``exposed_names`` gives the other side:
the sample names of a scrape in the Prometheus text format, so a test can check
``metric_names(expr) <= exposed_names(scrape)``.

Hand-written because the only PromQL parsers for Python are bindings to native
code we would install for this alone; PromQL's lexical structure is small.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["expand_grafana", "exposed_names", "metric_names"]

# Functions and aggregations of PromQL (Prometheus 2.x and 3.x).
FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "double_exponential_smoothing",
        "exp",
        "floor",
        "histogram_avg",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_stddev",
        "histogram_stdvar",
        "histogram_sum",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "info",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_by_label",
        "sort_by_label_desc",
        "sort_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
    ]
)
AGGREGATIONS = frozenset(
    [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ]
)
# Keywords that take a parenthesised list of label names.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
OTHER_KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})
# `@ start()` and `@ end()` modifiers.
AT_FUNCTIONS = frozenset({"start", "end"})

_UNIT = "(?:ms|s|m|h|d|w|y)"
_DURATION = rf"\d+{_UNIT}(?:\d+{_UNIT})*(?![\w.])"
_TOKEN = re.compile(
    rf"""
      (?P<space>\s+|\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>{_DURATION})
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    # A name starting with ":" (legal, unused) would read as a subquery's colon.
    | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
    | (?P<op>==|!=|=~|!~|>=|<=|[-+*/%^<>=,(){{}}\[\]@:])
    """,
    re.VERBOSE,
)


def _tokens(expr: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"PromQL: unexpected {expr[pos : pos + 10]!r} in {expr!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            yield kind, match.group()


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects.

    Raises ValueError on a function PromQL does not have, on a ``__name__``
    matched by regular expression (no fixed name to check), and on anything
    that is not a PromQL token, e.g. an unexpanded Grafana ``$variable``.
    """
    tokens = list(_tokens(expr))
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            i = _label_matchers(tokens, i + 1, names, expr)
            continue
        if kind == "ident":
            word = text.lower()
            if word in LABEL_LIST_KEYWORDS:
                i += 1
                if i < len(tokens) and tokens[i][1] == "(":
                    while i < len(tokens) and tokens[i][1] != ")":
                        i += 1
                i += 1
                continue
            if word in AGGREGATIONS or word in OTHER_KEYWORDS:
                i += 1
                continue
            if following == "(":
                previous = tokens[i - 1][1] if i else ""
                if text not in FUNCTIONS and not (previous == "@" and text in AT_FUNCTIONS):
                    raise ValueError(f"PromQL: unknown function {text!r} in {expr!r}")
                i += 1
                continue
            names.add(text)
        i += 1
    return names


def _label_matchers(tokens: list[tuple[str, str]], i: int, names: set[str], expr: str) -> int:
    """Skip a ``{...}`` block, collecting ``__name__="..."``; return the index after ``}``."""
    while i < len(tokens) and tokens[i][1] != "}":
        if tokens[i][1] == "__name__" and i + 2 < len(tokens):
            operator, (kind, value) = tokens[i + 1][1], tokens[i + 2]
            if operator != "=" or kind != "string":
                raise ValueError(f"PromQL: __name__ without a fixed name in {expr!r}")
            names.add(value[1:-1])
        i += 1
    if i == len(tokens):
        raise ValueError(f"PromQL: unclosed {{ in {expr!r}")
    return i + 1


_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
GRAFANA_INTERVALS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "6h",
    "__interval_ms": "60000",
    "__range_s": "21600",
}


def expand_grafana(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana's ``$var``, ``${var}`` and ``[[var]]`` so promtool can parse the result.

    Interval variables become durations; any other variable becomes
    ``variables[name]``, by default ``.*`` (dashboard variables sit inside
    regex label matchers).
    """
    values = {**GRAFANA_INTERVALS, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, ".*")

    return _GRAFANA_VARIABLE.sub(replace, expr)


def exposed_names(exposition: str) -> set[str]:
    """Sample names in a scrape (Prometheus text format): ``x_total``, ``h_bucket`` ..."""
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
