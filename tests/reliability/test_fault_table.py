"""docs/reliability.md's fault table is the rendering of the suite's parametrization (fault_table.py): a case added
or changed in the tests without regenerating the doc fails here."""

from __future__ import annotations

from fault_table import in_doc, rows, table


def test_the_doc_table_is_generated_from_the_suite():
    assert in_doc() == table(), "regenerate: python tests/reliability/fault_table.py --write"


def test_the_suite_covers_at_least_50_kinds_of_fault_and_every_stage():
    cases = rows()
    assert len(cases) >= 50 and len({c[0] for c in cases}) == len(cases)  # ids unique
    assert {"sft", "reward", "dpo", "ppo", "evaluate", "promote", "run"} <= {c[1] for c in cases}
