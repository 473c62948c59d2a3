"""What commands print on stdout besides their sentences: a JSON document (whole, or streamed item by
item), and the tables and sizes of the text reports (the formats inspect's report uses too)."""

from __future__ import annotations

import json

import click

from ..inspection_render import format_table, human_size
from .context import Ctx

__all__ = ["JsonList", "emit_json", "end_json_list_with_error", "format_table", "human_size"]


def emit_json(obj) -> None:
    """One JSON document on stdout (--json)."""
    click.echo(json.dumps(obj, indent=2))


class JsonList:
    """One JSON document streamed to stdout: the members of ``head``, then ``member``, a list written item
    by item (a document too long to hold in memory, e.g. dump's entries).  ``close()`` ends it; an error
    raised before that ends it with an ``"error"`` member instead (:func:`end_json_list_with_error`, called
    by the error handler), so that stdout holds one JSON document either way."""

    def __init__(self, head: dict, member: str):
        click.echo(json.dumps(head, indent=2)[:-2] + f",\n  {json.dumps(member)}: [", nl=False)
        Ctx.json_stream_open = True
        self.items = 0

    def add(self, item) -> None:
        click.echo(("\n    " if self.items == 0 else ",\n    ") + json.dumps(item), nl=False)
        self.items += 1

    def close(self) -> None:
        Ctx.json_stream_open = False
        click.echo(("\n  ]\n}" if self.items else "]\n}"))


def end_json_list_with_error(error: dict) -> None:
    """Close the list a JsonList is streaming and end its document with ``"error": error``."""
    Ctx.json_stream_open = False
    body = json.dumps(error, indent=2).replace("\n", "\n  ")
    click.echo(f'\n  ],\n  "error": {body}\n}}')
