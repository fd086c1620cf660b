"""Find the input files behind `--input` and name the site each one belongs to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rlhf_pipeline.errors import UserError

POSTS_XML = "posts_xml"  # a Stack Exchange dump's Posts.xml
SITE_ARCHIVE = "7z"  # a site archive as the official dump publishes it (Posts.xml inside)
PREFERENCES_PARQUET = "preferences_parquet"  # HuggingFaceH4/stack-exchange-preferences schema
PREFERENCES_JSONL = "preferences_jsonl"
DUMP_FORMATS = (POSTS_XML, SITE_ARCHIVE)

# The official dump ships "<site>-Posts.7z", "<site>-Users.7z", ... for the largest sites; in a directory
# we take only the Posts archives and whole-site archives ("<site>.7z").
_OTHER_DUMP_TABLES = {"users", "comments", "votes", "badges", "posthistory", "postlinks", "tags"}


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str
    site: str


def discover_inputs(input_path: str, site_override: str | None) -> list[InputFile]:
    path = Path(input_path)
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_dir():
        if site_override:
            raise UserError(
                "--site names the site of a single input file; a directory's inputs are named by their paths"
            )
        found = [f for f in sorted(path.rglob("*")) if f.is_file() and _format_in_directory(f)]
        if not found:
            raise UserError(f"no inputs in directory {path}: expected Posts.xml, *.7z, *.parquet or *.jsonl files")
        inputs = [InputFile(f, _format_in_directory(f), site_name(f)) for f in found]  # type: ignore[arg-type]
    else:
        fmt = _format_of_file(path)
        inputs = [InputFile(path, fmt, site_override or site_name(path))]
    _check_sites_distinct(inputs)
    return inputs


def site_name(path: Path) -> str:
    """beer.stackexchange.com.7z -> beer.stackexchange.com; stackoverflow.com-Posts.7z -> stackoverflow.com;
    .../beer.stackexchange.com/Posts.xml (or .../<site>/train.parquet) -> the parent directory's name."""
    if path.name.lower().endswith(".7z"):
        stem = path.name[: -len(".7z")]
        return stem[: -len("-Posts")] if stem.lower().endswith("-posts") else stem
    return path.resolve().parent.name or path.stem


def _format_of_file(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".xml"):
        return POSTS_XML
    if name.endswith(".7z"):
        return SITE_ARCHIVE
    if name.endswith(".parquet"):
        return PREFERENCES_PARQUET
    if name.endswith(".jsonl"):
        return PREFERENCES_JSONL
    raise UserError(
        f"unsupported input {path}: expected Posts.xml, a site archive (.7z), a preference file "
        "(.parquet or .jsonl), or a directory of these"
    )


def _format_in_directory(path: Path) -> str | None:
    name = path.name.lower()
    if name == "posts.xml":
        return POSTS_XML
    if name.endswith(".7z"):
        table = name[: -len(".7z")].rpartition("-")[2]
        return None if table in _OTHER_DUMP_TABLES else SITE_ARCHIVE
    if name.endswith(".parquet"):
        return PREFERENCES_PARQUET
    if name.endswith(".jsonl"):
        return PREFERENCES_JSONL
    return None


def _check_sites_distinct(inputs: list[InputFile]) -> None:
    """Two dumps of one site would give the same qids twice (and leak questions across subsets).

    Several preference files of one site are normal (parquet shards), so only dumps must be unique,
    and a site must not come both as a dump and as preference files.
    """
    dump_site: dict[str, Path] = {}
    for inp in inputs:
        if inp.format in DUMP_FORMATS:
            if inp.site in dump_site:
                raise UserError(f"two dumps of site '{inp.site}': {dump_site[inp.site]} and {inp.path}")
            dump_site[inp.site] = inp.path
    for inp in inputs:
        if inp.format not in DUMP_FORMATS and inp.site in dump_site:
            raise UserError(
                f"site '{inp.site}' given both as a dump ({dump_site[inp.site]}) and as preferences ({inp.path})"
            )


class HashingReader:
    """A binary file wrapper that hashes (sha256) and counts the bytes as the parser reads them."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes_read += len(data)
        return data


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            sha.update(chunk)
    return sha.hexdigest()
