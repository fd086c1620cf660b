"""The in-memory shape of one question with its answers, shared by every input format.

Only one question (and its answers) is in memory at a time: sources yield these one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Answer:
    answer_id: int
    score: int  # the Askell preference score (already computed by the source)
    body_html: str


@dataclass
class Question:
    site: str
    post_id: int
    title: str  # plain text ("" for formats that put the title inside the body)
    body_html: str
    answers: list[Answer] = field(default_factory=list)

    @property
    def qid(self) -> str:
        """Unique across sites: post ids restart at 1 on every site, so the site is part of the key."""
        return f"{self.site}:{self.post_id}"
