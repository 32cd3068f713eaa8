"""The data gate: what `lorafuse data check` and the start of `lorafuse train` look for, before any GPU time.

Each finding has a kind, and config key data.checks.<kind> says what it does: warn, refuse (training
does not start) or off (not checked). The kinds and their defaults are config.DataChecks':
  duplicates          the same example twice in one split (normalised text: NFKC, case-folded, whitespace)
  near_duplicates     examples of one split whose word 3-shingle sets overlap (Jaccard) >= NEAR_THRESHOLD
  conflicts           the same prompt with different answers
  validation_leakage  validation examples that occur in train, exactly or nearly (as above)
  test_leakage        test examples that occur in train, exactly or nearly
  pii                 e-mail addresses, phone numbers, card numbers (Luhn), IBANs (mod 97), IP addresses,
                      API keys and private keys; values are masked wherever they are shown
  size                fewer than MIN_EXAMPLES training examples
  overlong            examples over max_seq_len tokens (needs a tokenizer)
Besides findings, the report describes each split's shape: answer lengths, the share of tokens that are
prompt and answer, and the label distribution when the answers come from a small set (classification).

An example's text, for duplicates and leakage, is its non-system turns (or prompt and completion): a
system prompt shared by every example would otherwise make every pair look alike. Its prompt, for
conflicts, is everything before its last assistant turn, system prompt included.

Near duplicates scale to millions of lines: each example's word 3-shingles are hashed (numpy), MinHash
signatures of NUM_PERM values are cut into BANDS bands, examples sharing a band are candidates, and each
candidate pair is verified by the exact Jaccard of its shingle sets (so a reported pair is really that
similar; LSH only decides which pairs are looked at). bench/bench_data_checks.py measures it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from .data import DataError, Example

MIN_EXAMPLES = 50
NEAR_THRESHOLD = 0.8  # Jaccard of word 3-shingle sets
SHINGLE = 3
BANDS, ROWS = 12, 6  # LSH: P(candidate | Jaccard s) = 1 - (1 - s^6)^12: 0.97 at 0.8, 0.17 at 0.5
NUM_PERM = BANDS * ROWS
ALL_PAIRS_UP_TO = 32  # a larger bucket is linked as a star and a chain, not every pair
MAX_SHOWN = 5  # examples (line numbers) shown per finding
MAX_LABELS = 50  # answers from at most this many distinct values are labels (classification)
LABEL_WORDS = 5  # ... each of at most this many words
CHUNK = 20_000  # examples hashed per numpy batch


@dataclass
class Source:
    """One file's examples as a split sees them (a mixed-in file is part of train)."""

    split: str  # train | validation | test
    path: str
    examples: list[Example]
    token_lengths: list[int] | None = None  # per example, before truncation (data.EncodeReport.lengths)
    docs: list | None = None  # tokenized (data.Document), for the prompt / answer token shares
    name: str = ""  # what the report calls it (default: the split); a mixed-in file is "mix PATH"


@dataclass
class Finding:
    kind: str
    level: str  # warn | refuse
    summary: str  # one line
    count: int
    occurrences: list[dict] = field(default_factory=list)  # every one, with FILE:LINE (values masked)

    @property
    def shown(self) -> list[str]:
        """The first few occurrences, as log lines."""
        return [_describe(self.kind, occ) for occ in self.occurrences[:MAX_SHOWN]]


@dataclass
class DataReport:
    findings: list[Finding]
    shape: dict  # split -> what its examples look like
    seconds: float = 0.0

    def refused(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "refuse"]

    def lines(self) -> list[str]:
        """Human lines: the shape of each split, then each finding with its first occurrences."""
        out = [f"{split}: {describe_shape(s)}" for split, s in self.shape.items()]
        for f in self.findings:
            out.append(f"{f.level}: {f.kind}: {f.summary}")
            out += [f"    {s}" for s in f.shown]
        return out

    def to_json(self) -> dict:
        return {"findings": [dataclasses.asdict(f) for f in self.findings], "shape": self.shape,
                "seconds": round(self.seconds, 3), "refused": [f.kind for f in self.refused()]}


def _describe(kind: str, occ: dict) -> str:
    if kind == "duplicates":
        more = " ..." if len(occ["repeats"]) > 4 else ""
        return f"{occ['first']} repeated at {', '.join(occ['repeats'][:4])}{more}"
    if kind in ("near_duplicates", "conflicts"):
        refs = occ["examples"]
        joined = (" ~ " if kind == "near_duplicates" else ", ").join(refs[:4])
        return joined + (f" ... ({len(refs)} examples)" if len(refs) > 4 else "")
    if kind.endswith("_leakage"):
        how = "=" if occ["exact"] else "~"
        return f"{occ['example']} {how} {occ['train']}" + ("" if occ["exact"] else f" ({occ['similarity']:.2f})")
    if kind == "pii":
        return f"{occ['example']}: {occ['what']} {occ['value']}"
    if kind == "overlong":
        return f"{occ['example']} ({occ['tokens']} tokens)"
    return ", ".join(f"{k} {v}" for k, v in occ.items())


def refusal_message(report: DataReport) -> str:
    kinds = ", ".join(f"{f.kind} ({f.summary})" for f in report.refused())
    return (f"the data check refuses this data: {kinds}. Fix the data, or set data.checks.<kind>: warn "
            "(or off) to train anyway")


# ----------------------------------------------------------------------------------------------
# Texts of an example


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def example_parts(ex: Example) -> tuple[str, str, str]:
    """(prompt, answer, content): the prompt before the last answer, that answer, and the text compared for
    duplicates and leakage (every turn but system prompts)."""
    if ex.messages is None:
        return ex.prompt or "", ex.completion or "", f"{ex.prompt}\n{ex.completion}"
    msgs = ex.messages
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last])
    content = "\n".join(m["content"] for m in msgs if m["role"] != "system")
    return prompt, msgs[last]["content"], content


def example_strings(ex: Example) -> list[str]:
    if ex.messages is None:
        return [ex.prompt or "", ex.completion or ""]
    return [m["content"] for m in ex.messages]


# ----------------------------------------------------------------------------------------------
# Personal data and secrets

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?!\.?\d)(?![\w])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,5}(?:[ .-]\d{1,5}){1,5}(?![\w-])"
                    r"|(?<![\w+])\+\d{8,15}(?!\w)")
_SECRETS = {
    "private key": r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY-----",
    "AWS access key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "GitHub token": r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b",
    "Slack token": r"\bxox[abposr]-[A-Za-z0-9-]{10,255}",
    "Stripe key": r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{16,255}\b",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}(?![\w-])",
    "API key (sk-)": r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,255}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,255}\b",
    "JSON web token": r"\beyJ[A-Za-z0-9_-]{8,4096}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{8,4096}",
    "assigned secret": r"(?i:\b(?:api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|password|passwd))"
                       r"[\"']?[ \t]{0,3}[:=][ \t]{0,3}[\"']?[A-Za-z0-9_\-/+=.]{12,255}",
}
_SECRET = re.compile("|".join(f"(?P<s{i}>{p})" for i, p in enumerate(_SECRETS.values())))
_SECRET_NAMES = {f"s{i}": name for i, name in enumerate(_SECRETS)}
_DATE = re.compile(r"\d{4}[-./ ]\d{1,2}[-./ ]\d{1,2}|\d{1,2}[-./ ]\d{1,2}[-./ ]\d{2,4}")
PII_KINDS = ("email", "phone", "card", "iban", "ip", "secret")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    code = text.replace(" ", "")
    if not 15 <= len(code) <= 34:
        return False
    moved = code[4:] + code[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def mask(value: str) -> str:
    """Enough to find the value again in the file, never the value: first two and last two characters."""
    value = " ".join(value.split())
    if len(value) <= 6:
        return value[0] + "*" * (len(value) - 1)
    return f"{value[:2]}{'*' * min(len(value) - 4, 12)}{value[-2:]}"


def masked(text: str) -> str:
    """text with every piece of personal data in it masked."""
    for _, value in find_pii(text):
        text = text.replace(value, mask(value))
    return text


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, value) for every piece of personal data or secret in text; a secret's kind is 'secret:<what it
    looks like>'. Every pattern is bounded, so a very long line costs linear time."""
    found: list[tuple[str, str]] = []
    taken: list[tuple[int, int]] = []  # spans already reported (a card is not also a phone number)

    def add(kind: str, m: re.Match) -> None:
        found.append((kind, m.group()))
        taken.append(m.span())

    def free(m: re.Match) -> bool:
        a, b = m.span()
        return all(b <= s or a >= e for s, e in taken)

    if "@" in text:
        for m in _EMAIL.finditer(text):
            add("email", m)
    if _secret_trigger(text):
        for m in _SECRET.finditer(text):
            if free(m):
                add("secret:" + _SECRET_NAMES[m.lastgroup], m)
    if _IPV6_TRIGGER.search(text):
        for m in _IPV6.finditer(text):
            if free(m) and m.group().count(":") >= 2 and any(c not in ":" for c in m.group()):
                try:
                    ipaddress.IPv6Address(m.group())
                except ValueError:
                    continue
                add("ip", m)
    if not _NUMBER_TRIGGER.search(text):
        return found
    for m in _IBAN.finditer(text):
        if free(m) and iban_ok(m.group()):
            add("iban", m)
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if free(m) and 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits):
            add("card", m)
    for m in _IPV4.finditer(text):
        if free(m):
            add("ip", m)
    for m in _PHONE.finditer(text):
        value = m.group()
        digits = sum(ch.isdigit() for ch in value)
        # E.164 allows 15 digits with the country code; a national number has at most 12 (longer runs in
        # groups are account or card numbers, not phone numbers)
        if free(m) and 9 <= digits <= (15 if value.startswith("+") else 12) and not _DATE.fullmatch(value):
            add("phone", m)
    return found


# What each kind needs somewhere in its text, searched in a whole chunk of texts at once (each pattern starts
# with a literal or a character class, which the regex engine skips to quickly), so that find_pii runs only
# on the few texts that have one.
_NUMBER_TRIGGER = re.compile(r"\d[\d .:()+/-]{5,}\d")  # card, phone, IBAN (its digits), IPv4
_IPV6_TRIGGER = re.compile(r":[0-9A-Fa-f]{0,4}:")
_SECRET_LITERALS = ("-----BEGIN", "AKIA", "ASIA", "gho_", "ghp_", "ghs_", "ghu_", "ghr_", "github_pat_", "xox",
                    "k_live_", "k_test_", "AIza", "sk-", "hf_", "eyJ")
_SECRET_WORDS = tuple(re.compile(w + r"[\"']?[ \t]{0,3}[:=]") for w in ("key", "token", "passwd", "password"))


def _secret_trigger(text: str) -> bool:
    if any(lit in text for lit in _SECRET_LITERALS):
        return True
    low = text.lower()
    return any(p.search(low) for p in _SECRET_WORDS)


def pii_in(texts: list[str]) -> list[tuple[int, str, str]]:
    """(index of the text, kind, value) over many texts: the triggers run once over all of them joined."""
    joined = "\n".join(t.replace("\n", " ") for t in texts)
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    hit: set[int] = set()

    def mark(positions) -> None:
        hit.update(np.searchsorted(starts, np.fromiter(positions, dtype=np.int64), side="right") - 1)

    for pattern in (_NUMBER_TRIGGER, _IPV6_TRIGGER):
        mark(m.start() for m in pattern.finditer(joined))
    low = joined.lower()
    for pattern in _SECRET_WORDS:
        mark(m.start() for m in pattern.finditer(low))
    for lit in ("@", *_SECRET_LITERALS):
        mark(_find_all(joined, lit))
    return [(i, kind, value) for i in sorted(int(i) for i in hit) for kind, value in find_pii(texts[i])]


def _find_all(text: str, needle: str):
    at = text.find(needle)
    while at >= 0:
        yield at
        at = text.find(needle, at + 1)


# ----------------------------------------------------------------------------------------------
# Near duplicates: MinHash over word 3-shingles, LSH bands, exact Jaccard of each candidate pair

# A word: a run of characters that are not ASCII spaces or punctuation (any non-ASCII character is part of a
# word). The same definition on bytes (word_hashes) and on text (words_of), so LSH and verification agree.
_WORD = re.compile(r"[^\x00-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]+")
_WORD_BYTE = np.array([not (c < 128 and not (chr(c).isalnum() or c == 95)) for c in range(256)])
_POWER = np.uint64(0x100000001B3)  # odd: its powers never vanish mod 2**64
_rng = np.random.default_rng(20240611)  # fixed: the same data gives the same candidates on every run
_PERM_A = (_rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)  # odd multipliers
_PERM_B = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
_BAND_MIX = (_rng.integers(1, 2**63, ROWS, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
_K1, _K2, _K3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


def words_of(normalised: str) -> list[str]:
    return _WORD.findall(normalised)


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash of every word of every text, in order; index of each text's first word), computed over the
    UTF-8 bytes of all texts at once. The texts are normalised: no newline inside one."""
    data = np.frombuffer("\n".join(texts).encode(), dtype=np.uint8)
    is_word = _WORD_BYTE[data]
    before = np.concatenate([[False], is_word[:-1]])
    after = np.concatenate([is_word[1:], [False]])
    begin = np.flatnonzero(is_word & ~before)
    end = np.flatnonzero(is_word & ~after) + 1
    lengths = end - begin
    starts = np.searchsorted(np.searchsorted(np.flatnonzero(data == 10), begin), np.arange(len(texts)))
    if not len(begin):
        return np.zeros(0, dtype=np.uint64), starts
    chars = np.flatnonzero(is_word)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # each word's first character, in `chars`
    offset = np.arange(len(chars)) - np.repeat(first, lengths)
    powers = np.ones(int(lengths.max()), dtype=np.uint64)  # 1, P, P^2, ... (wrapping)
    powers[1:] = np.cumprod(np.full(len(powers) - 1, _POWER, dtype=np.uint64))
    values = (data[chars].astype(np.uint64) + np.uint64(1)) * powers[offset]
    return _mix(np.add.reduceat(values, first) + lengths.astype(np.uint64)), starts


def shingles(words: list[str]) -> set[tuple[str, ...]]:
    if len(words) < SHINGLE:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0  # texts without words are alike only when equal


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (xor-shift-multiply): spreads word-id combinations over all bits."""
    x = x ^ (x >> np.uint64(33))
    x = x * _K2
    x = x ^ (x >> np.uint64(29))
    return x


def band_keys(word_ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[docs, BANDS] uint64 LSH keys of documents given as one array of word hashes and each document's start.

    A document of n words has max(1, n - 2) shingles: words i, i+1, i+2; a shorter one is padded with
    zeros, so it has one.
    """
    n_docs = len(starts)
    lengths = np.diff(np.append(starts, len(word_ids))).astype(np.int64)
    doc_of = np.repeat(np.arange(n_docs), lengths)
    padded_lengths = np.maximum(lengths, SHINGLE)
    padded_starts = np.concatenate([[0], np.cumsum(padded_lengths)[:-1]]).astype(np.int64)
    w = np.zeros(int(padded_lengths.sum()), dtype=np.uint64)
    w[padded_starts[doc_of] + np.arange(len(word_ids)) - np.asarray(starts, dtype=np.int64)[doc_of]] = word_ids
    sh = _mix((w[:-2] * _K1) ^ (w[1:-1] * _K2) ^ (w[2:] * _K3))
    # shingle p is one of a document's when it ends inside that document
    ends = np.repeat(padded_starts + padded_lengths, padded_lengths)[:-2]
    sh = sh[np.arange(len(sh)) + SHINGLE - 1 < ends]
    n_sh = padded_lengths - (SHINGLE - 1)
    sh_starts = np.concatenate([[0], np.cumsum(n_sh)[:-1]]).astype(np.int64)
    sig = np.empty((n_docs, NUM_PERM), dtype=np.uint64)
    for p in range(NUM_PERM):
        sig[:, p] = np.minimum.reduceat((sh * _PERM_A[p] + _PERM_B[p]) >> np.uint64(32), sh_starts)
    keys = np.empty((n_docs, BANDS), dtype=np.uint64)
    for b in range(BANDS):
        keys[:, b] = _mix((sig[:, b * ROWS:(b + 1) * ROWS] * _BAND_MIX).sum(axis=1) + np.uint64(b))
    return keys


def candidate_pairs(keys: np.ndarray) -> set[tuple[int, int]]:
    """Index pairs (i < j) that share a band: every pair of a small bucket, a star and a chain of a large one."""
    pairs: set[tuple[int, int]] = set()
    for b in range(keys.shape[1]):
        col = keys[:, b]
        order = np.argsort(col, kind="stable")
        sorted_keys = col[order]
        edges = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
        bounds = np.concatenate([[0], edges, [len(col)]])
        big = np.flatnonzero(np.diff(bounds) > 1)
        for k in big:
            members = sorted(order[bounds[k]:bounds[k + 1]].tolist())
            if len(members) <= ALL_PAIRS_UP_TO:
                pairs.update((a, c) for i, a in enumerate(members) for c in members[i + 1:])
            else:
                pairs.update((members[0], c) for c in members[1:])
                pairs.update(zip(members[1:-1], members[2:]))
    return pairs


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# ----------------------------------------------------------------------------------------------
# The checks


@dataclass
class _Rows:
    """Per example of every source, in order: where it is and what it is."""

    source: np.ndarray  # int32 index into sources
    line: np.ndarray  # int64
    split: list[str]
    content_key: np.ndarray  # int64 hash of the normalised content
    prompt_key: np.ndarray
    answer_key: np.ndarray
    has_prompt: np.ndarray  # bool


def check_data(sources: list[Source], levels: dict[str, str], max_seq_len: int | None = None,
               near_threshold: float = NEAR_THRESHOLD) -> DataReport:
    """Run every check whose level is not 'off' over the sources; levels maps each kind to warn | refuse | off."""
    t0 = time.perf_counter()
    on = {k for k, v in levels.items() if v != "off"}
    findings: list[Finding] = []

    def report(kind: str, summary: str, count: int, occurrences: list[dict]) -> None:
        if count and kind in on:
            findings.append(Finding(kind, levels[kind], summary, count, occurrences))

    where = lambda i: f"{sources[rows.source[i]].path}:{rows.line[i]}"  # noqa: E731

    rows, word_keys, pii = _scan(sources, want_words=bool(on & {"near_duplicates", "validation_leakage",
                                                                 "test_leakage"}), want_pii="pii" in on)
    split = np.asarray([{"train": 0, "validation": 1, "test": 2}[s] for s in rows.split], dtype=np.int8)

    # ---- exact duplicates within a split, exact leakage into validation and test
    first_of: dict[tuple[int, int], int] = {}  # (split, content key) -> first row
    dup_groups: dict[int, list[int]] = defaultdict(list)
    for i in np.lexsort((np.arange(len(split)), rows.content_key, split)).tolist():
        key = (int(split[i]), int(rows.content_key[i]))
        j = first_of.setdefault(key, i)
        if j != i:
            dup_groups[j].append(i)
    extra = sum(len(v) for v in dup_groups.values())
    groups = sorted(dup_groups.items())
    report("duplicates", f"{extra} example(s) repeat an earlier one of the same split ({len(groups)} distinct)",
           extra, [{"first": where(j), "repeats": [where(i) for i in g]} for j, g in groups])
    train_keys = {k for (s, k) in first_of if s == 0}
    leaked: dict[str, dict[int, tuple[int, float]]] = {"validation": {}, "test": {}}  # row -> (train row, similarity)
    for (s, k), i in first_of.items():
        if s and k in train_keys:
            leaked["validation" if s == 1 else "test"][i] = (first_of[(0, k)], 1.0)

    # ---- near duplicates and near leakage, over one row per distinct (split, content)
    if word_keys is not None:
        reps = np.asarray(sorted(first_of.values()), dtype=np.int64)
        pairs = candidate_pairs(word_keys[reps])
        near_uf, near_pairs = _UnionFind(), []
        cache: dict[int, set] = {}

        def shingle_set(i: int) -> set:
            if i not in cache:
                _, _, content = example_parts(sources[rows.source[i]].examples[_index_in_source(rows, i)])
                cache[i] = shingles(words_of(normalise(content)))
            return cache[i]

        for a, b in sorted(pairs):
            i, j = int(reps[a]), int(reps[b])
            if rows.content_key[i] == rows.content_key[j]:
                continue  # exact: reported above
            si, sj = int(split[i]), int(split[j])
            if si == sj:
                if near_uf.find(i) == near_uf.find(j):
                    continue
            elif 0 not in (si, sj):
                continue  # validation vs test: not a check of ours
            else:
                held = j if si == 0 else i
                name = "validation" if split[held] == 1 else "test"
                if held in leaked[name]:
                    continue
            sim = jaccard(shingle_set(i), shingle_set(j))
            if sim < near_threshold:
                continue
            if si == sj:
                near_uf.union(i, j)
                near_pairs.append((i, j, sim))
            else:
                train_row, held = (i, j) if si == 0 else (j, i)
                leaked["validation" if split[held] == 1 else "test"][held] = (train_row, sim)
        clusters: dict[int, list[int]] = defaultdict(list)
        for i, j, _ in near_pairs:
            for x in (i, j):
                clusters[near_uf.find(x)].append(x)
        members = {root: sorted(set(v)) for root, v in clusters.items()}
        involved = sum(len(v) for v in members.values())
        pairs_of: dict[int, list] = defaultdict(list)
        for i, j, sim in near_pairs:
            pairs_of[near_uf.find(i)].append([where(i), where(j), round(sim, 3)])
        report("near_duplicates", f"{len(members)} group(s) of near-duplicate examples ({involved} examples, "
               f"word 3-shingle overlap >= {near_threshold:.0%})", involved,
               [{"examples": [where(i) for i in m], "pairs": pairs_of[root]}
                for root, m in sorted(members.items(), key=lambda kv: kv[1])])
    for name in ("validation", "test"):
        hits = leaked[name]
        for j, g in dup_groups.items():  # every copy of a leaked example leaks
            if j in hits:
                hits.update({i: hits[j] for i in g})
        n_held = int((split == (1 if name == "validation" else 2)).sum())
        exact = {i for i, (t, _) in hits.items() if rows.content_key[i] == rows.content_key[t]}
        report(f"{name}_leakage", f"{len(hits)} of {n_held} {name} examples also occur in train: {len(exact)} "
               f"exactly (=), {len(hits) - len(exact)} nearly (~)", len(hits),
               [{"example": where(i), "train": where(t), "exact": i in exact, "similarity": round(sim, 3)}
                for i, (t, sim) in sorted(hits.items())])

    # ---- conflicts: one prompt, several answers
    if "conflicts" in on:
        by_prompt: dict[int, dict[int, int]] = defaultdict(dict)  # prompt key -> answer key -> first row
        for i in np.flatnonzero(rows.has_prompt).tolist():
            by_prompt[int(rows.prompt_key[i])].setdefault(int(rows.answer_key[i]), i)
        conflicts = sorted(sorted(v.values()) for v in by_prompt.values() if len(v) > 1)
        report("conflicts", f"{len(conflicts)} prompt(s) with different answers (one line per answer)", len(conflicts),
               [{"examples": [where(i) for i in c]} for c in conflicts])

    # ---- personal data
    if pii is not None:
        for kind in PII_KINDS:
            hits = [(i, name, value) for i, name, value in pii if name.split(":")[0] == kind]
            if hits:
                lines = len({i for i, _, _ in hits})
                report("pii", f"{len(hits)} {kind} value(s) on {lines} line(s)", len(hits),
                       [{"example": where(i), "what": name.replace("secret:", ""), "value": mask(value)}
                        for i, name, value in hits])

    # ---- size and shape
    n_train = int((split == 0).sum())
    report("size", f"{n_train} training examples (fewer than {MIN_EXAMPLES}: too few to learn much, and to trust "
           "a validation loss)", int(n_train < MIN_EXAMPLES), [{"examples": n_train}])
    if max_seq_len:
        over = [{"example": f"{s.path}:{ex.line}", "tokens": n} for s in sources if s.token_lengths
                for ex, n in zip(s.examples, s.token_lengths) if n > max_seq_len]
        report("overlong", f"{len(over)} example(s) over max_seq_len={max_seq_len} tokens", len(over), over)
    names = list(dict.fromkeys(src.name or src.split for src in sources))
    shape = {name: describe_split([src for src in sources if (src.name or src.split) == name]) for name in names}
    return DataReport(findings, shape, time.perf_counter() - t0)


def _index_in_source(rows: _Rows, i: int) -> int:
    return i - int(np.searchsorted(rows.source, rows.source[i]))


def _scan(sources: list[Source], want_words: bool, want_pii: bool):
    """One pass over every example: keys of its normalised texts, its LSH band keys, its personal data."""
    n = sum(len(s.examples) for s in sources)
    content_key, prompt_key, answer_key = (np.empty(n, dtype=np.int64) for _ in range(3))
    has_prompt = np.empty(n, dtype=bool)
    source_of = np.repeat(np.arange(len(sources), dtype=np.int32), [len(s.examples) for s in sources])
    line_of = np.fromiter((ex.line for s in sources for ex in s.examples), dtype=np.int64, count=n)
    split_of = [s.split for s in sources for _ in s.examples]
    keys = np.empty((n, BANDS), dtype=np.uint64) if want_words else None
    pii: list[tuple[int, str, str]] | None = [] if want_pii else None
    examples = [ex for s in sources for ex in s.examples]
    for first in range(0, n, CHUNK):
        contents, raw = [], []
        for i, ex in enumerate(examples[first:first + CHUNK], start=first):
            prompt, answer, content = example_parts(ex)
            norm_content, norm_prompt = normalise(content), normalise(prompt)
            # hash() is salted per process: equal texts get equal keys within this run, which is all we need
            content_key[i], prompt_key[i] = hash(norm_content), hash(norm_prompt)
            answer_key[i] = hash(normalise(answer))
            has_prompt[i] = bool(norm_prompt)
            contents.append(norm_content)
            if pii is not None:
                raw.append("\n".join(example_strings(ex)))
        if keys is not None:
            keys[first:first + len(contents)] = band_keys(*word_hashes(contents))
        if pii is not None:
            pii.extend((first + i, kind, value) for i, kind, value in pii_in(raw))
    rows = _Rows(source_of, line_of, split_of, content_key, prompt_key, answer_key, has_prompt)
    return rows, keys, pii


# ----------------------------------------------------------------------------------------------
# Shape


def _spread(values) -> dict:
    a = np.asarray(values)
    if not len(a):
        return {}
    return {"min": int(a.min()), "median": int(np.median(a)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def describe_split(sources: list[Source]) -> dict:
    """Examples, answer lengths, prompt vs answer tokens, labels."""
    examples = [ex for s in sources for ex in s.examples]
    answers = [example_parts(ex)[1] for ex in examples]
    out: dict = {"examples": len(examples), "answer_chars": _spread([len(a) for a in answers])}
    docs = [d for s in sources for d in (s.docs or [])]
    if docs:
        total = sum(len(d) for d in docs)
        trained = sum(int(d.trained[1:].sum()) for d in docs)
        out["tokens"] = total
        out["answer_token_share"] = round(trained / total, 4) if total else 0.0
        out["answer_tokens"] = _spread([int(d.trained[1:].sum()) for d in docs])
    labels = Counter(normalise(a) for a in answers)
    if len(labels) <= min(MAX_LABELS, len(examples) // 3) and all(len(k.split()) <= LABEL_WORDS for k in labels):
        out["labels"] = {masked(k): n for k, n in labels.most_common()}
    return out


def describe_shape(shape: dict) -> str:
    parts = [f"{shape['examples']} examples"]
    if a := shape.get("answer_chars"):
        parts.append(f"answer length (characters) min {a['min']} / median {a['median']} / p95 {a['p95']} "
                     f"/ max {a['max']}")
    if "answer_token_share" in shape:
        share = shape["answer_token_share"]
        parts.append(f"{shape['tokens']} tokens: {1 - share:.0%} prompt, {share:.0%} answer (trained)")
    if labels := shape.get("labels"):
        n = sum(labels.values())
        top = ", ".join(f"{k[:24]!r} {v} ({v / n:.0%})" for k, v in list(labels.items())[:8])
        more = f", ... ({len(labels)} labels)" if len(labels) > 8 else f" ({len(labels)} labels)"
        parts.append(f"labels {top}{more}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# The gate as training runs it


def levels_of(checks) -> dict[str, str]:
    """{kind: level} of a config.DataChecks."""
    return dict(vars(checks))


def gate(sources: list[Source], checks, max_seq_len: int | None, log) -> DataReport:
    """The start of `lorafuse train`: log each finding as a [data] line; raise DataError when one refuses."""
    levels = levels_of(checks)
    if all(v == "off" for v in levels.values()):
        return DataReport([], {})
    report = check_data(sources, levels, max_seq_len)
    for f in report.findings:
        log(f"[data] {f.level}: {f.kind}: {f.summary}" + (f"; first: {f.shown[0]}" if f.shown else ""))
    if report.refused():
        raise DataError(refusal_message(report))
    return report
