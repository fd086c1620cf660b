"""Helpers for the prepare-data tests: hand-made Posts.xml dumps (the name is unique: tests/ has no packages)."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr


def posts_xml(rows: list[dict[str, object]]) -> str:
    """A Posts.xml document with one <row> per dict (attribute order kept, values XML-escaped)."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    for row in rows:
        attrs = " ".join(f"{k}={quoteattr(str(v))}" for k, v in row.items())
        lines.append(f"  <row {attrs} />")
    lines.append("</posts>")
    return "\n".join(lines) + "\n"


def question(id_: int, accepted: int | None = None, title: str = "A question?", body: str = "<p>Why?</p>") -> dict:
    row: dict[str, object] = {"Id": id_, "PostTypeId": 1, "Score": 3, "Title": title, "Body": body}
    if accepted is not None:
        row["AcceptedAnswerId"] = accepted
    return row


def answer(id_: int, parent: int, score: int, body: str | None = None) -> dict:
    return {
        "Id": id_,
        "PostTypeId": 2,
        "ParentId": parent,
        "Score": score,
        "Body": body if body is not None else f"<p>Answer {id_} with score {score}.</p>",
    }


def small_dump_rows() -> list[dict]:
    """Two questions with pairs (one of them with an accepted answer), and one with a single answer."""
    return [
        question(1, accepted=3),
        answer(2, 1, 10),
        answer(3, 1, 2),
        answer(4, 1, -2),
        question(5),
        answer(6, 5, 0),
        answer(7, 5, 7),
        question(8),
        answer(9, 8, 1),
    ]
