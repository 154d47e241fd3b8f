"""Detokenizers and reading recipes of the seven zero-shot corpora MDLM reports.

The public test sets of PTB, WikiText, LM1B and the scientific-papers sets are stored
pre-tokenized (spaces around punctuation, "@-@" number separators, PTB's "N" for numbers).
A model trained on raw web text is scored on them after undoing that tokenization, with the
rules MDLM applies (its `*_detokenizer` functions), so perplexities are comparable with the
numbers it and later masked-diffusion papers report. Each rule is applied in order to the
whole document.

Corpus names (`CORPORA`): ptb, wikitext, lm1b, lambada, ag_news (no detokenizer), pubmed and
arxiv (the WikiText rules, then the LM1B rules). A recipe also names the JSONL field / Parquet
column that holds the text in the usual releases (PTB "sentence", scientific papers "article";
"text" is the fallback) and how a .txt file splits into documents.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

Rule = tuple[str, str, bool]  # (pattern, replacement, pattern is a regular expression)


def _apply(text: str, rules: Sequence[Rule]) -> str:
  for pattern, repl, is_regex in rules:
    text = re.sub(pattern, repl, text) if is_regex else text.replace(pattern, repl)
  return text


def _lit(*pairs: str) -> list[Rule]:
  """Literal (old, new) replacements, given as a flat list old1, new1, old2, new2, ..."""
  return [(pairs[i], pairs[i + 1], False) for i in range(0, len(pairs), 2)]


# A bracketed span loses the spaces inside its delimiters: "( a b )" -> "(a b)".
_TIGHT_SPANS = [(rf"{re.escape(o)}\s*([^{re.escape(c)}]*?)\s*{re.escape(c)}", rf"{o}\1{c}", True)
                for o, c in (("(", ")"), ("[", "]"), ("{", "}"), ('"', '"'), ("'", "'"))]

# MDLM's WikiText rules also hold a regex that only matches the literal text "/' <digit>/" and
# writes "/'[0-9]/" in its place; real text never has it, so it is left out here.
_WIKITEXT = [
    *_lit("s '", "s'"),
    *_lit(" @-@ ", "-", " @,@ ", ",", " @.@ ", "."),  # number separators
    *_lit(" : ", ": ", " ; ", "; ", " . ", ". ", " ! ", "! ", " ? ", "? ", " , ", ", "),
    *_TIGHT_SPANS,
    *_lit("= = = =", "====", "= = =", "===", "= =", "=="),  # section heading marks
    *_lit(" \u00b0 ", "\u00b0", " \n", "\n", "\n ", "\n"),
    *_lit(" N ", " 1 ", " 's", "'s"),
]

_PTB = [
    *_lit(" 's", "'s", "s ' ", "s' ", " n't", "n't", " \n ", "\n", "\\/", "/"),
    (r"(?<= )N(?= )", "1", True),  # every space-delimited "N" (number placeholder), runs too
    *_lit("$ 1", "$1", "# 1", "#1", "<unk>", "?"),
]

_LM1B = [
    *_lit("http : / / ", "http://", "https : / / ", "https://"),
    (r" '(\w+)", r"'\1", True),
    (r" (\w+) \. ", r" \1. ", True),
    (r" (\w+) \.$", r" \1.", True),
    *_lit(" ? ", "? "), (r" \?$", "?", True),
    *_lit(" ! ", "! "), (r" \!$", "!", True),
    *_lit(" , ", ", ", " : ", ": ", " ; ", "; ", " / ", "/"),
    (r'" ([^"]+) "', r'"\1"', True),
    (r"' ([^']+) '", r"'\1'", True),
    (r"\( ([^()]+) \)", r"(\1)", True),
    (r"\[ ([^\[\]]+) \]", r"[\1]", True),
    *_lit("$ ", "$", "\u00a3 ", "\u00a3"),
]


def wikitext_detokenizer(text: str) -> str:
  """WikiText: number separators, punctuation spacing, tight brackets and quotes, headings."""
  return _apply(text, _WIKITEXT)


def ptb_detokenizer(text: str) -> str:
  """Penn Treebank: clitics, escaped slashes, "N" -> "1", "<unk>" -> "?"."""
  return _apply(text, _PTB)


def lm1b_detokenizer(text: str) -> str:
  """One Billion Words: URLs, clitics, punctuation spacing, tight quotes and brackets."""
  return _apply(text, _LM1B)


def lambada_detokenizer(text: str) -> str:
  """LAMBADA: typographic double quotes made plain; the passage opens with a newline."""
  return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


def scientific_papers_detokenizer(text: str) -> str:
  """arXiv / PubMed articles: the WikiText rules, then the LM1B rules."""
  return lm1b_detokenizer(wikitext_detokenizer(text))


@dataclasses.dataclass(frozen=True)
class CorpusRecipe:
  """How one named corpus is read: its detokenizer (None: text as is), the JSONL field or
  Parquet column of its text (first one present), and the .txt document split."""
  detokenizer: Callable[[str], str] | None
  fields: tuple[str, ...] = ("text",)
  txt_split: str = "paragraph"


CORPORA = {
    "ptb": CorpusRecipe(ptb_detokenizer, ("sentence", "text"), "line"),
    "wikitext": CorpusRecipe(wikitext_detokenizer),
    "lm1b": CorpusRecipe(lm1b_detokenizer, txt_split="line"),
    "lambada": CorpusRecipe(lambada_detokenizer, txt_split="line"),
    "ag_news": CorpusRecipe(None, txt_split="line"),
    "pubmed": CorpusRecipe(scientific_papers_detokenizer, ("article", "text")),
    "arxiv": CorpusRecipe(scientific_papers_detokenizer, ("article", "text")),
}


def corpus_recipe(name: str) -> CorpusRecipe:
  """The recipe of corpus `name` (see `CORPORA`); ValueError naming the known ones."""
  key = name.strip().lower()
  if key not in CORPORA:
    raise ValueError(f"unknown corpus name {name!r}; known: {', '.join(CORPORA)} (or give a "
                     "bare path for no detokenizer)")
  return CORPORA[key]
