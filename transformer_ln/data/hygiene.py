"""Text that was already tokenized for another toolkit: BPE ``@@ `` continuation markers and Moses-escaped entities.

IWSLT and WMT preprocessed releases often ship subword-nmt's ``@@ `` markers and Moses' escapes (``&apos;``,
``&quot;``, ``&amp;``, ``&#91;``...). Trained on as they are, the model learns to emit them, every hypothesis holds
``&apos;`` and BLEU is computed on tokenized text. ``scan`` finds them (the trainer warns with the fix);
``clean`` (``data.unescape=true``) turns such a line back into plain text before our own BPE: markers joined,
entities unescaped with the standard library's ``html.unescape`` (it knows every entity Moses writes).
"""
from __future__ import annotations

import html
import logging
import re
from typing import Iterable

log = logging.getLogger(__name__)

BPE_MARKER = re.compile(r"@@( |$)")
MOSES_ENTITY = re.compile(r"&(apos|quot|amp|lt|gt|#91|#93|#124);")


def scan(lines: Iterable[str], limit: int = 20000) -> dict:
    """Count lines (of the first ``limit``) holding BPE markers or Moses entities, with one example of each."""
    found = {"lines": 0, "bpe": 0, "entities": 0, "bpe_example": None, "entity_example": None}
    for i, line in enumerate(lines):
        if i >= limit:
            break
        found["lines"] += 1
        if BPE_MARKER.search(line):
            found["bpe"] += 1
            found["bpe_example"] = found["bpe_example"] or line[:80]
        if MOSES_ENTITY.search(line):
            found["entities"] += 1
            found["entity_example"] = found["entity_example"] or line[:80]
    return found


def clean(line: str) -> str:
    """``"it@@ &apos;s a te@@ st"`` -> ``"it's a test"``: BPE markers joined, entities unescaped."""
    return html.unescape(BPE_MARKER.sub("", line))


def check(ds, where: str, unescape: bool):
    """One split (a ``datasets.Dataset`` with columns src, tgt), cleaned when ``unescape`` (an Arrow ``map``, so
    a large corpus stays on disk); otherwise a warning naming the fix if marked text is found in its first lines."""
    if unescape:
        return ds.map(lambda b: {k: [clean(x) for x in b[k]] for k in ("src", "tgt")}, batched=True,
                      desc="data.unescape")
    head = ds[:20000]
    found = scan((x for pair in zip(head["src"], head["tgt"]) for x in pair), limit=40000)
    kinds = [f"{found['bpe']} with BPE '@@ ' markers (e.g. {found['bpe_example']!r})"] if found["bpe"] else []
    kinds += [f"{found['entities']} with Moses-escaped entities (e.g. {found['entity_example']!r})"] \
        if found["entities"] else []
    if kinds:
        log.warning("%s: of %d lines checked, %s. This text was tokenized for another toolkit: the model would "
                    "learn to write the markers and BLEU would score tokenized text. Set data.unescape=true to "
                    "join the markers and unescape the entities before our own BPE.", where, found["lines"],
                    "; ".join(kinds))
    return ds
