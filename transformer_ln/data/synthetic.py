"""A built-in, seeded language pair: the default corpus for the demo and the tests (no download, no network).

The source is simple English from a small grammar (pronouns, nouns with articles, numbers and adjectives, transitive,
intransitive and saying verbs, negation, prepositional phrases, adverbs, "that"-clauses, adverbial subordinate
clauses before or after the main clause, coordination). The target is an invented language whose rules need real
translation, so copying the source scores near 0 BLEU:

* a lexicon of made-up stems (fixed, independent of the corpus seed); nouns have an arbitrary gender;
* case and agreement: articles inflect for gender, number and case (nominative subject, accusative object, dative
  after a preposition); adjectives follow the noun and agree with it (and take ``-n`` in the accusative); pronouns
  have three case forms; verbs agree with the subject's person and number (English mostly does not show it);
* word order: negation and adverbs follow the verb; in subordinate clauses the verb moves to the end, and a main
  clause after a fronted subordinate clause puts its verb before the subject. Two pairs from seed 1234:

      She believes that he does not build a ball.  ->  Sa verumemat ke lu unon borur ne rugebat.
      Because the mouse sleeps, the children sleep.  ->  Porke lo nugim rodifat, rodifant li vonenoten.

Every rule is deterministic and the source parse is unambiguous, so the mapping is a function a small model learns
in minutes; no noise is added.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Iterator, Optional

MIN_WORDS, MAX_WORDS = 3, 40  # whitespace-separated words of source and target

# ---------------------------------------------------------------------------------------------------------------
# source lexicon (English)

NOUNS = [  # (singular, plural)
    ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"), ("horse", "horses"), ("cow", "cows"), ("duck", "ducks"),
    ("mouse", "mice"), ("man", "men"), ("woman", "women"), ("child", "children"), ("boy", "boys"),
    ("girl", "girls"), ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("king", "kings"),
    ("queen", "queens"), ("student", "students"), ("friend", "friends"), ("baker", "bakers"),
    ("house", "houses"), ("garden", "gardens"), ("car", "cars"), ("book", "books"), ("letter", "letters"),
    ("apple", "apples"), ("cake", "cakes"), ("ball", "balls"), ("tree", "trees"), ("river", "rivers"),
    ("city", "cities"), ("village", "villages"), ("table", "tables"), ("window", "windows"), ("song", "songs"),
    ("picture", "pictures"),
]
TRANSITIVE = ["see", "like", "find", "buy", "sell", "carry", "build", "paint", "read", "write", "open", "follow",
              "help", "visit", "love", "wash", "watch", "call"]
INTRANSITIVE = ["sleep", "run", "swim", "sing", "dance", "laugh", "wait", "work", "fall", "jump", "smile", "walk"]
SAYING = ["say", "think", "know", "believe", "hope"]
ADJECTIVES = ["big", "small", "old", "young", "red", "green", "happy", "sad", "tall", "quiet", "loud", "fast",
              "slow", "rich", "poor", "clever", "brave", "kind", "angry", "strange"]
ADVERBS = ["today", "often", "again", "quickly", "slowly", "always", "now", "together"]
PREPOSITIONS = ["in", "on", "near", "under", "behind", "with"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
SUBORDINATORS = ["because", "when", "if", "while", "although"]
COORDINATORS = ["and", "but"]
# person/number -> (nominative, accusative) in English
PRONOUNS = {"1sg": ("I", "me"), "2sg": ("you", "you"), "3sg.m": ("he", "him"), "3sg.f": ("she", "her"),
            "3sg.n": ("it", "it"), "1pl": ("we", "us"), "3pl": ("they", "them")}

# ---------------------------------------------------------------------------------------------------------------
# target grammar (hand-written function words; content stems come from `_lexicon`)

T_PRONOUNS = {  # person -> (nominative, accusative, dative)
    "1sg": ("mo", "min", "mim"), "2sg": ("to", "tin", "tim"), "3sg.m": ("lu", "lun", "lum"),
    "3sg.f": ("sa", "san", "sam"), "3sg.n": ("ce", "cen", "cem"), "1pl": ("nos", "nosin", "nosim"),
    "3pl": ("ili", "ilin", "ilim"),
}
T_DEF = {  # (gender or "pl", case) -> definite article
    ("m", "nom"): "lo", ("m", "acc"): "lon", ("m", "dat"): "lom",
    ("f", "nom"): "la", ("f", "acc"): "la", ("f", "dat"): "lar",
    ("n", "nom"): "le", ("n", "acc"): "le", ("n", "dat"): "lom",
    ("pl", "nom"): "li", ("pl", "acc"): "li", ("pl", "dat"): "lin",
}
T_INDEF = {
    ("m", "nom"): "un", ("m", "acc"): "unon", ("m", "dat"): "unom",
    ("f", "nom"): "una", ("f", "acc"): "una", ("f", "dat"): "unar",
    ("n", "nom"): "un", ("n", "acc"): "un", ("n", "dat"): "unom",
}
T_PLURAL = {"m": "en", "f": "ar", "n": "i"}          # noun plural suffix by gender
T_ADJ = {"m": "o", "f": "a", "n": "e", "pl": "i"}     # adjective agreement suffix; accusative adds "n"
T_VERB = {"1sg": "as", "2sg": "is", "3sg": "at", "1pl": "amos", "3pl": "ant"}  # verb agreement suffix
T_FUNCTION = {"not": "ne", "that": "ke", "and": "e", "but": "sed", "because": "porke", "when": "kuan", "if": "se",
              "while": "dum", "although": "malgre", "in": "en", "on": "sur", "near": "apud", "under": "sub",
              "behind": "post", "with": "kun"}


@lru_cache(maxsize=1)
def _lexicon() -> dict:
    """Made-up target stems, one per source word, drawn once from a fixed seed (the corpus seed never changes them).

    A stem is rejected when one of its inflected forms collides with another word, so every target word form has
    exactly one meaning.
    """
    rng = random.Random("transformer_ln synthetic lexicon v1")
    cons, vows = "bdfgklmnprstvz", "aeiou"
    taken = set(T_DEF.values()) | set(T_INDEF.values()) | set(T_FUNCTION.values())
    taken |= {w for forms in T_PRONOUNS.values() for w in forms}
    english = {w.lower() for pair in NOUNS for w in pair} | set(TRANSITIVE + INTRANSITIVE + SAYING + ADJECTIVES)

    def stem(suffixes: list[str]) -> str:
        while True:
            n_syl = rng.choice((2, 2, 3))
            s = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(n_syl)) + rng.choice(cons)
            forms = {s + x for x in suffixes}
            if not forms & taken and s not in english:
                taken.update(forms)
                return s

    lex: dict = {"noun": [], "gender": [], "verb": {}, "adj": {}, "adv": {}, "num": {}}
    for _ in NOUNS:
        g = rng.choice("mfn")
        lex["gender"].append(g)
        lex["noun"].append(stem(["", T_PLURAL[g]]))
    verb_suffixes = list(T_VERB.values())
    for v in TRANSITIVE + INTRANSITIVE + SAYING:
        lex["verb"][v] = stem(verb_suffixes)
    for a in ADJECTIVES:
        lex["adj"][a] = stem([x + c for x in T_ADJ.values() for c in ("", "n")])
    for w in ADVERBS:
        lex["adv"][w] = stem([""])
    for w in NUMBERS:
        lex["num"][w] = stem([""])
    return lex


# ---------------------------------------------------------------------------------------------------------------
# abstract syntax: a sentence is drawn once and rendered into both languages


@dataclass
class NP:
    pronoun: Optional[str] = None  # a PRONOUNS key, or None for a noun phrase
    noun: int = 0
    plural: bool = False
    det: str = "the"               # "the", "a", "num", "the num", "bare"
    number: str = ""
    adjs: list = field(default_factory=list)

    @property
    def person(self) -> str:
        if self.pronoun:
            return self.pronoun.split(".")[0]
        return "3pl" if self.plural else "3sg"


@dataclass
class Clause:
    subj: NP
    verb: str
    kind: str                      # "trans", "intrans", "say"
    obj: Optional[NP] = None
    comp: Optional["Clause"] = None  # the "that"-clause of a saying verb
    pp: Optional[tuple] = None     # (preposition, NP)
    adv: Optional[str] = None
    neg: bool = False


def _draw_np(rng: random.Random, allow_pronoun: bool = True) -> NP:
    if allow_pronoun and rng.random() < 0.2:
        return NP(pronoun=rng.choice(list(PRONOUNS)))
    np_ = NP(noun=rng.randrange(len(NOUNS)), plural=rng.random() < 0.4)
    if np_.plural:
        np_.det = rng.choices(("the", "num", "the num", "bare"), (4, 3, 1, 2))[0]
        if "num" in np_.det:
            np_.number = rng.choice(NUMBERS)
    else:
        np_.det = rng.choices(("the", "a"), (65, 35))[0]
    if rng.random() < 0.35:
        np_.adjs.append(rng.choice(ADJECTIVES))
        if rng.random() < 0.2:
            np_.adjs.append(rng.choice([a for a in ADJECTIVES if a != np_.adjs[0]]))
    return np_


def _draw_clause(rng: random.Random, depth: int = 0) -> Clause:
    kind = rng.choices(("trans", "intrans", "say"), (6, 3, 1.5 if depth < 2 else 0))[0]
    verb = rng.choice({"trans": TRANSITIVE, "intrans": INTRANSITIVE, "say": SAYING}[kind])
    c = Clause(subj=_draw_np(rng), verb=verb, kind=kind, neg=rng.random() < 0.2)
    if kind == "trans":
        c.obj = _draw_np(rng)
    if kind == "say":
        c.comp = _draw_clause(rng, depth + 1)
        return c  # no PP or adverb on a saying verb: they would be ambiguous in the source
    if rng.random() < 0.25:
        c.pp = (rng.choice(PREPOSITIONS), _draw_np(rng))
    if rng.random() < 0.25:
        c.adv = rng.choice(ADVERBS)
    return c


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _src_np(np_: NP, case: str) -> list[str]:
    if np_.pronoun:
        return [PRONOUNS[np_.pronoun][0 if case == "nom" else 1]]
    noun = NOUNS[np_.noun][1 if np_.plural else 0]
    words = np_.adjs + [noun]
    if np_.det == "a":
        return ["an" if words[0][0] in "aeiou" else "a"] + words
    return {"the": ["the"], "num": [np_.number], "the num": ["the", np_.number], "bare": []}[np_.det] + words


def _src_verb(c: Clause) -> list[str]:
    third_sg = c.subj.person == "3sg"
    if c.neg:
        return ["does" if third_sg else "do", "not", c.verb]
    if not third_sg:
        return [c.verb]
    v = c.verb
    if v.endswith(("s", "sh", "ch", "x", "o")):
        return [v + "es"]
    if v.endswith("y") and v[-2] not in "aeiou":
        return [v[:-1] + "ies"]
    return [v + "s"]


def _src_clause(c: Clause) -> list[str]:
    words = _src_np(c.subj, "nom") + _src_verb(c)
    if c.obj:
        words += _src_np(c.obj, "acc")
    if c.comp:
        words += ["that"] + _src_clause(c.comp)
    if c.pp:
        words += [c.pp[0]] + _src_np(c.pp[1], "dat")
    if c.adv:
        words.append(c.adv)
    return words


def _tgt_np(np_: NP, case: str) -> list[str]:
    lex = _lexicon()
    if np_.pronoun:
        return [T_PRONOUNS[np_.pronoun][("nom", "acc", "dat").index(case)]]
    g = lex["gender"][np_.noun]
    agr = "pl" if np_.plural else g
    stem = lex["noun"][np_.noun]
    words = [stem + T_PLURAL[g] if np_.plural else stem]
    words += [lex["adj"][a] + T_ADJ[agr] + ("n" if case == "acc" else "") for a in np_.adjs]
    number = [lex["num"][np_.number]] if np_.number else []
    if np_.det == "a":
        return [T_INDEF[(g, case)]] + words
    if np_.det.startswith("the"):
        return [T_DEF[(agr, case)]] + number + words
    return number + words


def _tgt_clause(c: Clause, order: str) -> list[str]:
    """order: "main" (S V neg adv O PP), "inverted" (V S ...) or "sub" (S adv O PP neg V; a "that"-clause follows)."""
    lex = _lexicon()
    subj = _tgt_np(c.subj, "nom")
    verb = [lex["verb"][c.verb] + T_VERB[c.subj.person]]
    neg = [T_FUNCTION["not"]] if c.neg else []
    adv = [lex["adv"][c.adv]] if c.adv else []
    obj = _tgt_np(c.obj, "acc") if c.obj else []
    pp = [T_FUNCTION[c.pp[0]]] + _tgt_np(c.pp[1], "dat") if c.pp else []
    comp = [T_FUNCTION["that"]] + _tgt_clause(c.comp, "sub") if c.comp else []
    if order == "sub":
        if comp:  # the "that"-clause is extraposed after the final verb
            return subj + neg + verb + comp
        return subj + adv + obj + pp + neg + verb
    head = verb + subj if order == "inverted" else subj + verb
    return head + neg + adv + obj + pp + comp


def _sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    shape = rng.choices(("simple", "sub_after", "sub_before", "coord"), (45, 20, 15, 20))[0]
    a = _draw_clause(rng)
    if shape == "simple":
        return _src_clause(a) + ["."], _tgt_clause(a, "main") + ["."]
    b = _draw_clause(rng)
    if shape == "coord":
        conj = rng.choice(COORDINATORS)
        comma = [","] if conj == "but" else []
        src = _src_clause(a) + comma + [conj] + _src_clause(b)
        tgt = _tgt_clause(a, "main") + comma + [T_FUNCTION[conj]] + _tgt_clause(b, "main")
        return src + ["."], tgt + ["."]
    sub = rng.choice(SUBORDINATORS)
    if shape == "sub_after":
        src = _src_clause(a) + [sub] + _src_clause(b)
        tgt = _tgt_clause(a, "main") + [T_FUNCTION[sub]] + _tgt_clause(b, "sub")
    else:
        src = [sub] + _src_clause(b) + [","] + _src_clause(a)
        tgt = [T_FUNCTION[sub]] + _tgt_clause(b, "sub") + [","] + _tgt_clause(a, "inverted")
    return src + ["."], tgt + ["."]


def _detokenize(words: list[str]) -> str:
    """Join words as running text: capital first letter, no space before "," and "."."""
    text = " ".join(words).replace(" ,", ",").replace(" .", ".")
    return text[0].upper() + text[1:]


def iter_synthetic(seed: int) -> Iterator[tuple[str, str]]:
    """An endless, deterministic stream of (source, target) pairs, each side MIN_WORDS to MAX_WORDS words long."""
    rng = random.Random(seed)
    while True:
        src, tgt = (_detokenize(words) for words in _sentence(rng))
        if all(MIN_WORDS <= len(text.split()) <= MAX_WORDS for text in (src, tgt)):
            yield src, tgt


def generate_synthetic(n: int, seed: int) -> list[tuple[str, str]]:
    """The first ``n`` pairs of the stream for ``seed`` (a prefix of any longer call with the same seed)."""
    if n < 0:
        raise ValueError(f"n: got {n}, must be >= 0")
    return list(islice(iter_synthetic(seed), n))


def synthetic_splits(train_size: int, seed: int, eval_size: int = 500) -> dict[str, list[tuple[str, str]]]:
    """train = the first ``train_size`` pairs; valid and test = the next pairs whose source is new (no overlap)."""
    stream = iter_synthetic(seed)
    splits = {"train": list(islice(stream, train_size))}
    seen = {s for s, _ in splits["train"]}
    for name in ("valid", "test"):
        out: list[tuple[str, str]] = []
        for s, t in stream:
            if s not in seen:
                seen.add(s)
                out.append((s, t))
                if len(out) == eval_size:
                    break
        splits[name] = out
    return splits
