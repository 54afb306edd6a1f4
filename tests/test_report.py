"""Markdown tables: the exact text, alignment codes, and rows that do not fit refused."""
import pytest

from variator_jax.report import markdown_table


def test_markdown_table_text():
    text = markdown_table(["policy", "p50 ms", "mix"],
                          [["adaptive", 1.5, ""], ("off", "2.0", "a / b")], align="lrc")
    assert text == ("| policy | p50 ms | mix |\n"
                    "|---|---:|:---:|\n"
                    "| adaptive | 1.5 |  |\n"
                    "| off | 2.0 | a / b |")
    assert markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"  # Default: left.


def test_markdown_table_refuses_rows_and_alignments_that_do_not_fit():
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="one of 'l', 'r', 'c' per column"):
        markdown_table(["a", "b"], [[1, 2]], align="r")
    with pytest.raises(ValueError, match="one of 'l', 'r', 'c' per column"):
        markdown_table(["a", "b"], [[1, 2]], align="rx")
