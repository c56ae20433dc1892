"""Text that was already tokenized for another toolkit: BPE ``@@ `` continuation markers and Moses-escaped entities.

IWSLT and WMT preprocessed releases often ship subword-nmt's ``@@ `` markers and Moses' escapes (``&apos;``,
``&quot;``, ``&amp;``, ``&#91;``...). Trained on as they are, the model learns to emit them, every hypothesis holds
``&apos;`` and BLEU is computed on tokenized text. ``scan`` finds them (the trainer warns with the fix);
``clean`` (``data.unescape=true``) turns such a line back into plain text before our own BPE: markers joined,
entities unescaped with the standard library's ``html.unescape`` (it knows every entity Moses writes).

Moses-*tokenized* text (``it 's a test , isn 't it ?``) also splits punctuation from words. Scored as it is against a
plain reference, BLEU tops out near 92 (sacreBLEU warns it was "forgotten to detokenize"). ``data.detokenize=moses``
turns each line back into plain text with ``sacremoses`` (markers joined, then ``MosesDetokenizer``, which unescapes
too) before our own BPE, on every split, so the model learns and writes plain text and BLEU compares detokenized
hypotheses with detokenized references. Detection only warns: a line is counted as Moses-tokenized when a word is
followed by a space and a ``,`` or ``.`` (then a space or the line's end), or by `` 's`` ``'t`` ``'re`` ``'ve`` ``'ll``
``'m`` ``'d`` (escaped or not) (``MOSES_SPACING``); plain prose almost never has these (French spaces before ``!?;:``,
never before ``,.``). A tenth of the checked lines is enough to warn; nothing changes without the setting.
"""
from __future__ import annotations

import html
import logging
import re
from typing import Iterable

log = logging.getLogger(__name__)

BPE_MARKER = re.compile(r"@@( |$)")
MOSES_ENTITY = re.compile(r"&(apos|quot|amp|lt|gt|#91|#93|#124);")
MOSES_SPACING = re.compile(r"\w [,.](\s|$)|\w (&apos;|')(s|t|re|ve|ll|m|d)\b")


def scan(lines: Iterable[str], limit: int = 20000) -> dict:
    """Count lines (of the first ``limit``) holding BPE markers or Moses entities, with one example of each."""
    found = {"lines": 0, "bpe": 0, "entities": 0, "moses": 0, "bpe_example": None, "entity_example": None,
             "moses_example": None}
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
        if MOSES_SPACING.search(line):
            found["moses"] += 1
            found["moses_example"] = found["moses_example"] or line[:80]
    return found


def clean(line: str) -> str:
    """``"it@@ &apos;s a te@@ st"`` -> ``"it's a test"``: BPE markers joined, entities unescaped."""
    return html.unescape(BPE_MARKER.sub("", line))


def detokenizer(lang: str | None = None):
    """``line -> plain text`` for Moses-tokenized ``lang`` text (``en`` when unknown): BPE markers joined, then
    sacremoses' ``MosesDetokenizer`` (which also unescapes ``&apos;`` and the other entities)."""
    from sacremoses import MosesDetokenizer

    md = MosesDetokenizer(lang=lang or "en")
    return lambda line: md.detokenize(BPE_MARKER.sub("", line).split())


def cleaner(data_cfg):
    """``{"src": fn, "tgt": fn}`` turning a line of each side into what the model is trained on, or ``None`` when
    ``data_cfg`` (a ``DataConfig``) asks for neither ``data.detokenize`` nor ``data.unescape``."""
    if getattr(data_cfg, "detokenize", "none") == "moses":
        return {"src": detokenizer(data_cfg.src_lang), "tgt": detokenizer(data_cfg.tgt_lang)}
    return {"src": clean, "tgt": clean} if data_cfg.unescape else None


def check(ds, where: str, data_cfg):
    """One split (a ``datasets.Dataset`` with columns src, tgt), cleaned as ``cleaner(data_cfg)`` says (an Arrow
    ``map``, so a large corpus stays on disk); otherwise a warning naming the fix if marked or Moses-tokenized
    text is found in its first lines."""
    fns = cleaner(data_cfg)
    if fns is not None:
        what = "data.detokenize" if data_cfg.detokenize != "none" else "data.unescape"
        return ds.map(lambda b: {k: [fns[k](x) for x in b[k]] for k in ("src", "tgt")}, batched=True, desc=what)
    head = ds[:20000]
    found = scan((x for pair in zip(head["src"], head["tgt"]) for x in pair), limit=40000)
    kinds = [f"{found['bpe']} with BPE '@@ ' markers (e.g. {found['bpe_example']!r})"] if found["bpe"] else []
    kinds += [f"{found['entities']} with Moses-escaped entities (e.g. {found['entity_example']!r})"] \
        if found["entities"] else []
    if found["moses"] and found["moses"] * 10 >= found["lines"]:  # a tenth of the lines spaced like Moses' output
        kinds += [f"{found['moses']} Moses-tokenized (e.g. {found['moses_example']!r})"]
    if kinds:
        log.warning("%s: of %d lines checked, %s. This text was tokenized for another toolkit: the model would "
                    "learn to write the markers and BLEU would score tokenized text. Set data.detokenize=moses to "
                    "turn it into plain text (markers joined, entities unescaped, Moses' spacing undone) before our "
                    "own BPE, or data.unescape=true for the markers and entities only.", where, found["lines"],
                    "; ".join(kinds))
    return ds
