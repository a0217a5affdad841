"""How ``--help`` names option values: in the words command lines have used for decades.

Typer names a value by its Python type (``<str>``, ``<bool>``, ``<list[str]>``) and a
required argument in braces (``{MODEL}``). :class:`PlainHelpGroup`, the class of
edgeseal's root command, renames each value once, when the command tree is built:
``TEXT``, ``INTEGER``, ``FLOAT``, ``PATH``/``FILE``/``DIR``, the option's name for a
choice (its values listed in its help), ``...`` after a value an option takes more
than once, nothing for a flag, and a required argument by its bare name. A metavar the
source gives (``--to DEVICE``) is kept.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperGroup

__all__ = ["PlainHelpGroup", "plain_metavar"]

_WORDS = {
    "str": "TEXT",
    "int": "INTEGER",
    "float": "FLOAT",
    "path": "PATH",
    "file": "FILE",
    "dir": "DIR",
    "Path": "PATH",
}


def plain_metavar(typer_display: str) -> str:
    """The plain name of a value typer displays as ``typer_display`` (``<list[str]>``
    gives ``TEXT...``, ``<bool>`` gives "", ``<a|b>`` gives ``a | b``)."""
    inner = typer_display.removeprefix("<").removesuffix(">")
    if inner == "bool":
        return ""
    if inner.startswith("list[") and inner.endswith("]"):
        return plain_metavar(inner[5:-1]) + "..."
    if "|" in inner:  # spaced, so a narrow terminal wraps the choices, not the names
        return " | ".join(inner.split("|"))
    return _WORDS.get(inner, inner.upper())


def _rename(command: Any, ctx: Any) -> None:
    _rename_params(command.params, ctx)
    help_option = command.get_help_option

    def plain_help_option(ctx: Any, made: Any = help_option) -> Any:
        """click makes --help per context; it is a flag, so its value has no name."""
        option = made(ctx)
        if option is not None:
            _rename_params([option], ctx)
        return option

    command.get_help_option = plain_help_option
    for sub in getattr(command, "commands", {}).values():
        _rename(sub, ctx)


def _rename_params(params: list[Any], ctx: Any) -> None:
    for param in params:
        if param.metavar is None:
            shown = param.display_type_rich(ctx=ctx)
            if isinstance(param, TyperArgument):
                param.metavar = param.name.upper() if param.name else shown
            elif shown is not None and "|" in shown:
                # A choice is named by its option (--quantize QUANTIZE) and its values
                # listed in the help: as the value column, they would leave the option
                # names too little room on an 80-column terminal.
                param.metavar = (param.name or "value").upper()
                choices = plain_metavar(shown).replace(" | ", ", ")
                param.help = f"{param.help or ''} One of: {choices}.".strip()
            elif shown is not None:
                param.metavar = plain_metavar(shown)
        if isinstance(param, TyperArgument):
            # typer wraps a required argument in braces on the usage line, and types it
            # by Python's words in the arguments panel; these two methods are typer's
            # own, replaced on this one argument.
            bare, kind = param.metavar or "", plain_metavar(param.display_type(ctx))
            param._usage_display_name = lambda bare=bare: bare  # type: ignore[method-assign,misc]
            param.display_type_rich = lambda ctx, kind=kind: kind  # type: ignore[method-assign,misc]


class PlainHelpGroup(TyperGroup):
    """The root command group: its whole tree names values plainly in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _rename(self, self.context_class(self))

    def get_params(self, ctx: Any) -> Any:
        """typer adds the shell-completion options after the group is made."""
        params = super().get_params(ctx)
        _rename_params(params, ctx)
        return params
