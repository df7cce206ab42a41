"""Sphinx extension of pushforward's documentation.

* ``pf-api`` (directive, argument: a public module): the module's ``__all__``, grouped as the
  comments in its ``__all__`` list group it, each name documented by autodoc where it is
  defined and as a short entry linking there where it is re-exported;
* ``pf-exec`` (directive): runs its Python code while the page is built and shows the code and
  what it printed; an exception fails the build (so printed plans, shapes and tables cannot
  drift from the library);
* one API page per public module (:data:`PUBLIC_MODULES`; ``api/generated/``) and one page per
  benchmark result set
  (``benchmarks/generated/``), written when the build starts, so a new public subpackage or a
  new result set gets its page without anyone editing the docs;
* at the end of the build, every name of every public ``__all__`` must be in the site's index
  with a docstring: a missing one is a warning, and the build turns warnings into errors.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging as stdlib_logging
import re
import tokenize
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

LOG = logging.getLogger(__name__)
ROOT_PACKAGE = "pushforward"


#: The public modules: the package and the subpackages users import. Other packages under
#: ``src/pushforward/`` (``core``, ``engine``, ``layers``, ...) are internal even where they
#: declare ``__all__`` for their siblings.
PUBLIC_MODULES = (
    "pushforward",
    "pushforward.botorch",
    "pushforward.covariance",
    "pushforward.curvature",
    "pushforward.distributed",
    "pushforward.laplace_interop",
    "pushforward.persistence",
    "pushforward.testing",
)


def public_modules() -> list[str]:
    """The names of :data:`PUBLIC_MODULES`, each imported (a missing one is an error)."""
    for name in PUBLIC_MODULES:
        importlib.import_module(name)
    return list(PUBLIC_MODULES)


@dataclass(frozen=True)
class Group:
    """Names of ``__all__`` under one comment (``title`` empty for an ungrouped list)."""

    title: str
    names: tuple[str, ...]


def all_groups(module: ModuleType) -> list[Group]:
    """``module.__all__`` split at the comment lines inside the list literal."""
    source = inspect.getsource(module)
    start = source.index("__all__ = [")
    end = source.index("]", start)
    groups: list[Group] = []
    title, names = "", []
    for tok in tokenize.generate_tokens(io.StringIO(source[start : end + 1]).readline):
        if tok.type == tokenize.COMMENT:
            if names:
                groups.append(Group(title, tuple(names)))
            title, names = tok.string.lstrip("#").strip(), []
        elif tok.type == tokenize.STRING:
            names.append(eval(tok.string))  # a string literal of the list
    if names:
        groups.append(Group(title, tuple(names)))
    listed = [n for g in groups for n in g.names]
    if sorted(listed) != sorted(module.__all__):
        raise RuntimeError(f"{module.__name__}.__all__ is not a plain list of string literals")
    return groups


def home_of(obj: object, modules: list[str]) -> str:
    """The public module that documents ``obj`` in full: the most specific public module it
    is defined under and exported by, else the first that exports it."""
    exporters = [m for m in modules if obj_in_all(obj, m)]
    defined = getattr(obj, "__module__", None) or ""
    if inspect.ismodule(obj):
        return obj.__name__
    inside = [m for m in exporters if defined == m or defined.startswith(m + ".")]
    return max(inside, key=len) if inside else exporters[0]


def obj_in_all(obj: object, module_name: str) -> bool:
    module = importlib.import_module(module_name)
    return any(getattr(module, n) is obj for n in module.__all__)


def summary(obj: object) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def own_doc(obj: object) -> str:
    """``obj``'s own docstring (a class's, not one inherited from a base class)."""
    if inspect.isclass(obj):
        return inspect.cleandoc(obj.__dict__.get("__doc__") or "")
    return inspect.getdoc(obj) or ""


def kind_of(obj: object) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return "data"


class ApiDirective(SphinxDirective):
    """``.. pf-api:: pushforward.curvature`` — the module's public names, grouped."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        module = importlib.import_module(name)
        modules = self.env.app.config.pf_public_modules
        lines: list[str] = []
        for group in all_groups(module):
            if group.title:
                lines += [f".. rubric:: {group.title[0].upper()}{group.title[1:]}", ""]
            for attr in group.names:
                lines += self.entry(name, attr, getattr(module, attr), modules)
        content = StringList(lines, source=f"<pf-api {name}>")
        holder = nodes.container()
        self.state.nested_parse(content, self.content_offset, holder)
        return holder.children

    @staticmethod
    def entry(module: str, attr: str, obj: object, modules: list[str]) -> list[str]:
        kind = kind_of(obj)
        if kind == "module":
            return [f"* Subpackage :mod:`{obj.__name__}`: {summary(obj)}", ""]
        home = home_of(obj, modules)
        if home == module:
            directive = {
                "class": "autoclass",
                "exception": "autoexception",
                "function": "autofunction",
                "data": "autodata",
            }[kind]
            extra = ["   :no-value:"] if kind == "data" else []
            return [f".. {directive}:: {module}.{attr}", *extra, ""]
        domain = {"exception": "exception"}.get(kind, kind)
        return [
            f".. py:{domain}:: {attr}",
            f"   :module: {module}",
            "",
            f"   The same object as :py:{'obj'}:`{home}.{attr}`: {summary(obj)}",
            "",
        ]


class ExecDirective(SphinxDirective):
    """Run the directive's Python code while the page is built; show the code and its output.

    The code runs in a fresh namespace; an exception is an error of the build, with the
    traceback."""

    has_content = True

    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(
                    compile(code, f"{self.env.docname}.md (pf-exec)", "exec"), {"__name__": "docs"}
                )
        except Exception:
            raise self.error(
                f"the example in {self.env.docname} raised:\n{traceback.format_exc()}"
            ) from None
        shown = nodes.literal_block(code, code, language="python")
        printed = out.getvalue().rstrip("\n")
        if not printed:
            return [shown]
        result = nodes.literal_block(printed, printed, language="text")
        result["classes"].append("pf-exec-output")
        caption = nodes.paragraph(text="Output (computed when this page was built):")
        caption["classes"].append("pf-exec-caption")
        return [shown, caption, result]


class WarningFilter(stdlib_logging.Filter):
    """Drop the warnings matching ``patterns`` (regular expressions searched in
    ``"<where>: <message>"``, where is the docstring or file the warning points at)."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]
        self.dropped = 0

    def filter(self, record: stdlib_logging.LogRecord) -> bool:
        where = getattr(record, "location", None)
        if isinstance(where, nodes.Node):
            where = logging.get_node_location(where)
        text = f"{where or ''}: {record.getMessage()}"
        if any(p.search(text) for p in self.patterns):
            self.dropped += 1
            return False
        return True


#: References from signatures (where a warning has no docstring location) to pushforward types
#: that are not public — a ``Plan``'s ``Problem``, a ``TypeVar``, a ``Literal``'s values: they
#: are shown unlinked, as there is no page to link to.
SIGNATURE_REFERENCES = (
    r"^(None|<unknown>|[^:]*api/generated/[^:]*)(:\d+)?: py:\w+ reference target not found: "
    r"(pushforward\.[\w.]+|'[^']*')$"
)


def install_warning_filters(app: Sphinx) -> None:
    """Put the filters in front of Sphinx's warning handler (before it counts the warning, so
    ``-W`` does not see it): the signature references above, and ``pf_deferred_warnings``."""
    app.pf_deferred = WarningFilter(app.config.pf_deferred_warnings)
    signatures = WarningFilter([SIGNATURE_REFERENCES])
    for handler in stdlib_logging.getLogger("sphinx").handlers:
        if isinstance(handler, logging.WarningStreamHandler):
            handler.filters[:0] = [signatures, app.pf_deferred]


def write_api_pages(app: Sphinx) -> None:
    """One page per public module under ``api/generated/`` (rewritten only when it changes,
    so incremental builds stay incremental)."""
    modules = public_modules()
    app.config.pf_public_modules = modules
    out = Path(app.srcdir) / "api" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for name in modules:
        title = f"``{name}``"
        text = "\n".join(
            [
                title,
                "=" * len(title),
                "",
                f".. automodule:: {name}",
                "   :no-members:",
                "",
                f".. pf-api:: {name}",
                "",
            ]
        )
        page = out / f"{name}.rst"
        wanted.add(page.name)
        if not page.exists() or page.read_text() != text:
            page.write_text(text)
    for stale in out.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()


def result_set_page(table: Path, folder: str, up: str) -> str:
    """A result set's page: its ``results.md`` under a title naming the folder, its headings
    shifted so that the highest is a section of that page, relative links and images pointing
    at the folder, and its plot."""
    lines = table.read_text().splitlines()
    title = ""
    if lines and lines[0].startswith("# "):
        title, lines = lines[0][2:].strip(), lines[1:]
    levels = [len(m.group(1)) for line in lines if (m := re.match(r"(#+) ", line))]
    shift = 2 - min(levels, default=2)
    body = []
    fence = False
    for line in lines:
        fence ^= line.startswith("```")
        heading = re.match(r"(#+) ", line)
        if heading and not fence:
            line = "#" * (len(heading.group(1)) + shift) + line[len(heading.group(1)) :]
        body.append(re.sub(r"\]\((?![a-z]+:|/|#)([^)]+)\)", lambda m: f"]({up}{m.group(1)})", line))
    head = f"# `{folder}`" + (f": {title}" if title else "")
    plot = [f"![results]({up}results.png)", ""] if (table.parent / "results.png").exists() else []
    return "\n".join([head, "", *body, "", *plot])


def write_benchmark_pages(app: Sphinx) -> None:
    """One page per result set of the benchmark harness (``benchmarks/results/**/results.md``,
    not the scratch folder ``tmp/``) under ``benchmarks/generated/``."""
    results = Path(app.srcdir).parent / "benchmarks" / "results"
    out = Path(app.srcdir) / "benchmarks" / "generated"
    out.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for table in sorted(results.rglob("results.md")):
        folder = table.parent.relative_to(results)
        if "tmp" in folder.parts:
            continue
        name = "main" if folder.parts == () else "-".join(folder.parts)
        shown = "benchmarks/results/" + "".join(f"{p}/" for p in folder.parts)
        text = result_set_page(table, shown, "../../../" + shown)
        page = out / f"{name}.md"
        wanted.add(page.name)
        if not page.exists() or page.read_text() != text:
            page.write_text(text)
    for stale in out.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()


def check_every_name_documented(app: Sphinx, exception: Exception | None) -> None:
    """Warn (an error under ``-W``) for a public name missing from the index or without a
    docstring."""
    if exception is not None or app.builder.format != "html":
        return
    if app.pf_deferred.dropped:
        LOG.info(
            "%d docstring warnings deferred (pf_deferred_warnings in docs/conf.py)",
            app.pf_deferred.dropped,
        )
    objects = app.env.domains["py"].objects
    for name in app.config.pf_public_modules:
        module = importlib.import_module(name)
        if not inspect.getdoc(module):
            LOG.warning("public module %s has no docstring", name, type="pushforward")
        for attr in module.__all__:
            obj = getattr(module, attr)
            target = obj.__name__ if inspect.ismodule(obj) else f"{name}.{attr}"
            if target not in objects:
                LOG.warning(
                    "public name %s.%s is not in the API reference", name, attr, type="pushforward"
                )
            if not own_doc(obj):
                LOG.warning("public name %s.%s has no docstring", name, attr, type="pushforward")


def drop_object_base(app: Sphinx, name: str, obj: object, options: dict, bases: list) -> None:
    """No "Bases: object" line under a class that has no other base."""
    bases[:] = [b for b in bases if b is not object]


def drop_empty_bases(app: Sphinx, domain: str, objtype: str, content: nodes.Element) -> None:
    """Remove the "Bases:" line autodoc still writes when no base is left (Sphinx 9)."""
    if domain != "py" or objtype not in ("class", "exception"):
        return
    for child in list(content.children):
        if isinstance(child, nodes.paragraph) and child.astext().strip() == "Bases:":
            content.remove(child)


def setup(app: Sphinx) -> dict[str, object]:
    app.add_config_value("pf_public_modules", [], "env")
    app.add_config_value("pf_deferred_warnings", [], "env")
    app.add_directive("pf-api", ApiDirective)
    app.add_directive("pf-exec", ExecDirective)
    app.connect("builder-inited", install_warning_filters)
    app.connect("builder-inited", write_api_pages)
    app.connect("builder-inited", write_benchmark_pages)
    app.connect("autodoc-process-bases", drop_object_base)
    app.connect("object-description-transform", drop_empty_bases)
    app.connect("build-finished", check_every_name_documented)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
