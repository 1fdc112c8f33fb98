"""Tiny BEIR folders written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

# Twelve short documents on distinct topics, so both BM25 and MiniLM can find them.
DOCS: dict[str, tuple[str, str]] = {
    "d1": ("Photosynthesis", "Plants convert sunlight, water and carbon dioxide into glucose."),
    "d2": ("Volcanoes", "Magma rises through the crust and erupts as lava and ash."),
    "d3": ("Honey bees", "Bees collect nectar from flowers and make honey in the hive."),
    "d4": ("Black holes", "Gravity so strong that not even light escapes the event horizon."),
    "d5": ("Sourdough bread", "A starter of wild yeast and lactobacilli leavens the dough."),
    "d6": ("Vaccines", "Vaccination trains the immune system to recognise a pathogen."),
    "d7": ("Glaciers", "Slow rivers of ice carve valleys as they move downhill."),
    "d8": ("Chess openings", "The Sicilian Defence answers 1.e4 with the move c5."),
    "d9": ("Coral reefs", "Corals bleach when warm water drives out their symbiotic algae."),
    "d10": ("Tides", "The moon's gravity pulls the oceans, causing high and low tides."),
    "d11": ("Insulin", "The pancreas releases insulin to lower blood glucose levels."),
    "d12": ("Jet engines", "Turbofans compress air, burn fuel and push exhaust backwards."),
}
QUERIES: dict[str, str] = {
    "q1": "how do plants make sugar from sunlight",
    "q2": "why does lava erupt from volcanoes",
    "q3": "how is honey made by bees",
    "q4": "what hormone lowers blood sugar",
    "q5": "what causes ocean tides",
    "q6": "unjudged query about chess",
}
QRELS: list[tuple[str, str, int]] = [
    ("q1", "d1", 1),
    ("q2", "d2", 2),
    ("q3", "d3", 1),
    ("q4", "d11", 1),
    ("q4", "d1", 0),
    ("q5", "d10", 1),
]


def write_beir(
    root: Path,
    *,
    split: str = "test",
    crlf: bool = False,
    docs: dict[str, tuple[str, str]] | None = None,
    queries: dict[str, str] | None = None,
    qrels: list[tuple[str, str, int]] | None = None,
) -> Path:
    """Write corpus.jsonl, queries.jsonl and qrels/<split>.tsv under ``root``."""
    newline = "\r\n" if crlf else "\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    corpus_lines = [
        json.dumps({"_id": i, "title": t, "text": x, "metadata": {}})
        for i, (t, x) in (docs or DOCS).items()
    ]
    query_lines = [json.dumps({"_id": q, "text": t}) for q, t in (queries or QUERIES).items()]
    qrel_lines = ["query-id\tcorpus-id\tscore"] + [
        f"{q}\t{d}\t{s}" for q, d, s in (QRELS if qrels is None else qrels)
    ]
    for path, lines in (
        (root / "corpus.jsonl", corpus_lines),
        (root / "queries.jsonl", query_lines),
        (root / "qrels" / f"{split}.tsv", qrel_lines),
    ):
        path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
    return root
