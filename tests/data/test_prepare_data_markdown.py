"""HTML -> Markdown on real bodies from the beer dump (Ids picked for the markup they hold)."""

import re
import xml.etree.ElementTree as ET

import pytest

from rlhf_pipeline.data.markdown import to_markdown


@pytest.fixture(scope="module")
def beer_bodies(beer_posts) -> dict[str, str]:
    return {row.get("Id"): row.get("Body", "") for row in ET.parse(beer_posts).getroot()}


def test_code_block_becomes_fenced_code(beer_bodies):
    html = beer_bodies["154"]
    assert "<pre><code>Pale Lager" in html
    md = to_markdown(html)
    assert "```\nPale Lager    \nGeneric lager.\nPilsner" in md  # whitespace inside code is kept
    assert md.count("```") == 2
    assert md.endswith("I don't know all the styles.")


def test_entities_decoded_and_links_kept(beer_bodies):
    html = beer_bodies["3254"]
    assert "organic&amp;award-winning" in html
    md = to_markdown(html)
    assert "organic&award-winning" in md
    assert '"[daas beer](http://daasbeer.com)"' in md


def test_less_than_entities_and_line_break(beer_bodies):
    md = to_markdown(beer_bodies["5166"])
    assert "non pasturized <45°F (<7.2°C)  \nAnd even then" in md  # <br> -> hard line break
    assert "[Beer Storage](http://www.gcca.org/wp-content/uploads/2012/09/Beer.pdf)" in md


def test_image_kept_with_alt_text(beer_bodies):
    md = to_markdown(beer_bodies["3250"])
    assert "![Tennents](https://i.stack.imgur.com/WJn8O.jpg)" in md


def test_blockquote_holding_a_list(beer_bodies):
    md = to_markdown(beer_bodies["506"])
    assert "> - Winter Bock - 15 OG, 62.5 RDF" in md
    assert "> - Hazelnut Dark" in md


def test_ordered_list(beer_bodies):
    assert to_markdown(beer_bodies["3296"]) == "Most popular beer in Sri Lanka\n\n1. Lions\n2. Carlsberg"


def test_empty_body_is_empty():
    assert to_markdown("") == ""
    assert to_markdown("  \n") == ""
    assert to_markdown("<p></p>") == ""


# Any HTML tag name, opening or closing: what must not survive conversion.
HTML_TAG = re.compile(
    r"</?(?:p|a|img|pre|code|blockquote|ul|ol|li|em|strong|b|i|br|hr|h[1-6]|div|span|"
    r"table|tr|td|th|sup|sub|strike|del|kbd)\b[^>]*>",
    re.IGNORECASE,
)
ENTITY = re.compile(r"&(?:#\d+|#x[0-9a-f]+|[a-z]+);", re.IGNORECASE)


def test_no_html_tag_or_entity_left_in_any_beer_body(beer_bodies):
    with_tags = sum(bool(HTML_TAG.search(body)) for body in beer_bodies.values())
    assert with_tags > 2000  # the check below is meaningful: nearly every body is HTML
    for post_id, body in beer_bodies.items():
        md = to_markdown(body)
        assert md is not None, post_id
        assert not HTML_TAG.search(md), (post_id, HTML_TAG.search(md).group(0))
        assert not ENTITY.search(md), (post_id, ENTITY.search(md).group(0))
