"""The data gate (engine/data_checks.py): each check on crafted files (non-ASCII text, very long lines, CRLF
line ends), the near-duplicate detector's precision and recall on a generated set with known near copies,
levels (warn / refuse / off), and `lorafuse data check` with --validation, --test, --check and --json."""

import json
import random
import time

import pytest

from lorafuse.engine.config import DataChecks
from lorafuse.engine.data import DataError, Example, read_jsonl
from lorafuse.engine.data_checks import (
    NEAR_THRESHOLD,
    Source,
    check_data,
    example_parts,
    find_pii,
    gate,
    iban_ok,
    jaccard,
    levels_of,
    luhn_ok,
    normalise,
    shingles,
    words_of,
)

LEVELS = levels_of(DataChecks())
rng = random.Random(7)
VOCAB = ["straße", "köln", "café", "naïve", "東京", "данные", "žluťoučký", "über", "façade", "smørrebrød"] + \
    [f"word{i}" for i in range(3000)]


def sentence(n=40, r=rng):
    return " ".join(r.choice(VOCAB) for _ in range(n))


def pc(prompt, completion):
    return {"prompt": prompt, "completion": completion}


def chat(user, answer, system="You are helpful."):
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def write(path, rows, crlf=False):
    end = b"\r\n" if crlf else b"\n"
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + end for r in rows))
    return path


def run(tmp_path, train, validation=None, test=None, levels=None, crlf=False, **kw):
    sources = [Source("train", str(write(tmp_path / "train.jsonl", train, crlf)),
                      read_jsonl(tmp_path / "train.jsonl")[0])]
    for split, rows in (("validation", validation), ("test", test)):
        if rows is not None:
            path = write(tmp_path / f"{split}.jsonl", rows, crlf)
            sources.append(Source(split, str(path), read_jsonl(path)[0]))
    return check_data(sources, levels or LEVELS, **kw)


def by_kind(report):
    out = {}
    for f in report.findings:
        out.setdefault(f.kind, []).append(f)
    return out


def test_exact_duplicates_after_normalising_case_width_and_whitespace_with_crlf(tmp_path):
    base = [pc(sentence(), "ja") for _ in range(60)]
    train = base + [pc(base[3]["prompt"].upper().replace(" ", "  \t "), "JA"),  # line 61: same after folding
                    pc("ＡＢＣ  straße", "x"), pc("abc STRASSE", "x")]  # NFKC widths, casefold ß -> ss: 62 = 63
    found = by_kind(run(tmp_path, train, crlf=True))
    (dup,) = found["duplicates"]
    assert dup.count == 2
    assert [o["first"].split(":")[-1] for o in dup.occurrences] == ["4", "62"]
    assert dup.occurrences[0]["repeats"] == [f"{tmp_path / 'train.jsonl'}:61"]
    assert "near_duplicates" not in found and "size" not in found


def test_near_duplicates_within_a_split_with_non_ascii_words(tmp_path):
    train = [chat(sentence(), "ok") for _ in range(60)]
    words = train[10]["messages"][1]["content"].split()
    words[20] = "köln-bonn"
    train.append(chat(" ".join(words), "ok", system="A different system prompt is not compared."))
    (near,) = by_kind(run(tmp_path, train))["near_duplicates"]
    refs = [f"{tmp_path / 'train.jsonl'}:11", f"{tmp_path / 'train.jsonl'}:61"]
    ((a, b, similarity),) = near.occurrences[0]["pairs"]
    assert near.occurrences[0]["examples"] == [a, b] == refs and NEAR_THRESHOLD <= similarity < 1


def test_leakage_into_test_refuses_and_into_validation_warns_exact_and_near(tmp_path):
    train = [pc(sentence(), "a") for _ in range(60)]
    near = train[5]["prompt"].split()
    near[0] = "changed"
    test = [pc(sentence(), "a"), dict(train[2]), pc(" ".join(near), "a"), dict(train[2])]  # a copy of a leak leaks
    validation = [dict(train[7]), pc(sentence(), "b")]
    report = run(tmp_path, train, validation, test)
    found = by_kind(report)
    (leak,) = found["test_leakage"]
    assert leak.level == "refuse" and leak.count == 3
    assert [(o["example"].split(":")[-1], o["train"].split(":")[-1], o["exact"]) for o in leak.occurrences] == \
        [("2", "3", True), ("3", "6", False), ("4", "3", True)]
    assert NEAR_THRESHOLD <= leak.occurrences[1]["similarity"] < 1
    (vleak,) = found["validation_leakage"]
    assert vleak.level == "warn" and vleak.count == 1
    assert [f.kind for f in report.refused()] == ["test_leakage"]
    with pytest.raises(DataError, match=r"refuses this data: test_leakage \(3 of 4 test examples"):
        gate([Source("train", "t", read_jsonl(tmp_path / "train.jsonl")[0]),
              Source("test", "x", read_jsonl(tmp_path / "test.jsonl")[0])], DataChecks(), None, lambda *_: None)
    relaxed = DataChecks(test_leakage="warn")
    gate([Source("train", "t", read_jsonl(tmp_path / "train.jsonl")[0]),
          Source("test", "x", read_jsonl(tmp_path / "test.jsonl")[0])], relaxed, None, lambda *_: None)


def test_conflicts_same_prompt_different_answers(tmp_path):
    train = [pc(f"question {i}: {sentence(8)}", "yes") for i in range(60)]
    train += [pc(train[4]["prompt"], "no"), pc(train[4]["prompt"], "yes "), pc(train[9]["prompt"], "maybe")]
    (conflict,) = by_kind(run(tmp_path, train))["conflicts"]
    assert conflict.count == 2
    assert [[r.split(":")[-1] for r in o["examples"]] for o in conflict.occurrences] == [["5", "61"], ["10", "63"]]


@pytest.mark.parametrize("text, kind", [
    ("write to jürgen.müller@example.de today", "email"),
    ("call me on +44 20 7946 0958", "phone"),
    ("or (555) 123-4567", "phone"),
    ("card 4111 1111 1111 1111 exp 12/29", "card"),
    ("card 4111-1111-1111-1111", "card"),
    ("IBAN GB82 WEST 1234 5698 7654 32", "iban"),
    ("iban DE89370400440532013000", "iban"),
    ("server 192.168.10.254 is down", "ip"),
    ("v6 2001:db8:85a3::8a2e:370:7334", "ip"),
    ("aws AKIAIOSFODNN7EXAMPLE", "secret:AWS access key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "secret:private key"),
    ("token ghp_" + "a1B2" * 9, "secret:GitHub token"),
    ("OPENAI_API_KEY=sk-" + "x9Y8" * 8, "secret:API key (sk-)"),
    ('{"password": "hunter2hunter2"}', "secret:assigned secret"),
])
def test_pii_kinds(text, kind):
    assert [k for k, _ in find_pii(text)] == [kind]


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # fails Luhn
    "IBAN GB82 WEST 1234 5698 7654 33",  # fails mod 97
    "version 999.1.1.1 and 10:30:00 and 2024-01-15",  # not an address, a time, a date
    "order #123456, amount $1,234.56, 3.14159",
    "the key to success: practice",
])
def test_not_pii(text):
    assert find_pii(text) == []


def test_checksums():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 23")


def test_pii_counts_per_kind_and_masks_every_value(tmp_path):
    secrets = ["jane.roe@example.org", "4242 4242 4242 4242", "AKIAIOSFODNN7EXAMPLE"]
    train = [pc(sentence(20), "ok") for _ in range(60)]
    train[3] = pc(f"mail {secrets[0]} and pay with {secrets[1]}", "done")
    train[8] = chat(f"my key {secrets[2]}", f"noted, {secrets[0]}")
    report = run(tmp_path, train)
    pii = {f.summary.split()[1]: f for f in by_kind(report)["pii"]}
    assert pii["email"].count == 2 and "on 2 line(s)" in pii["email"].summary
    assert pii["card"].count == 1 and pii["secret"].count == 1
    assert [o["example"].split(":")[-1] for o in pii["email"].occurrences] == ["4", "9"]
    text = "\n".join(report.lines()) + json.dumps(report.to_json())
    for value in secrets:
        assert value not in text
    assert "ja" in pii["email"].occurrences[0]["value"] and "*" in pii["email"].occurrences[0]["value"]


def test_a_very_long_line_is_checked_in_linear_time(tmp_path):
    long_text = ("0123456789 " * 30_000) + "x" * 200_000 + " reach me at a.b@example.com"
    train = [pc(sentence(), "ok") for _ in range(60)] + [pc(long_text, "ok"), pc(long_text, "ok")]
    t0 = time.perf_counter()
    found = by_kind(run(tmp_path, train))
    assert time.perf_counter() - t0 < 10
    assert found["duplicates"][0].count == 1
    emails = [f for f in found["pii"] if "email" in f.summary]
    assert emails and emails[0].count == 2


def test_size_shape_labels_and_overlong(tmp_path):
    labels = ["billing"] * 20 + ["refund"] * 10 + ["privacy"] * 5
    train = [pc(sentence(10), label) for label in labels]
    train_path = write(tmp_path / "train.jsonl", train)
    examples = read_jsonl(train_path)[0]
    lengths = [30] * 34 + [900]
    report = check_data([Source("train", str(train_path), examples, token_lengths=lengths)], LEVELS, max_seq_len=512)
    found = by_kind(report)
    assert "35 training examples" in found["size"][0].summary
    (over,) = found["overlong"]
    assert over.occurrences == [{"example": f"{train_path}:35", "tokens": 900}]
    shape = report.shape["train"]
    assert shape["examples"] == 35 and shape["labels"] == {"billing": 20, "refund": 10, "privacy": 5}
    assert shape["answer_chars"] == {"min": 6, "median": 7, "p95": 7, "max": 7}
    assert "labels 'billing' 20 (57%)" in report.lines()[0]
    free_text = run(tmp_path, [pc(sentence(5), sentence(12)) for _ in range(60)]).shape["train"]
    assert "labels" not in free_text


def test_token_shares_with_a_tokenizer(tmp_path, tiny_tokenizer):
    from lorafuse.engine.data import encode_all

    train = [chat(sentence(12), "billing") for _ in range(60)]
    examples = read_jsonl(write(tmp_path / "t.jsonl", train))[0]
    docs, enc = encode_all(tiny_tokenizer, examples, 4096)
    shape = check_data([Source("train", "t", examples, enc.lengths, docs)], LEVELS).shape["train"]
    trained = sum(int(d.trained[1:].sum()) for d in docs)
    assert shape["tokens"] == sum(len(d) for d in docs)
    assert shape["answer_token_share"] == round(trained / shape["tokens"], 4)
    assert 0 < shape["answer_token_share"] < 0.5


def test_off_skips_a_check_and_refuse_is_per_kind(tmp_path):
    train = [pc(sentence(), "a") for _ in range(60)]
    train.append(dict(train[0]))
    levels = {**LEVELS, "duplicates": "off"}
    assert "duplicates" not in by_kind(run(tmp_path, train, levels=levels))
    levels = {**LEVELS, "duplicates": "refuse"}
    assert [f.kind for f in run(tmp_path, train, levels=levels).refused()] == ["duplicates"]


def test_near_duplicate_precision_and_recall_on_known_near_copies(capsys):
    """2,000 random texts of 30-80 words and 400 copies with 1-6 words replaced or inserted: a pair is a
    near duplicate when the Jaccard of its word 3-shingle sets is >= NEAR_THRESHOLD (computed exactly here)."""
    r = random.Random(11)
    texts = [sentence(r.randint(30, 80), r) for _ in range(2000)]
    planted = []
    for k in range(400):
        i = r.randrange(2000)
        words = texts[i].split()
        for _ in range(1 + k % 6):
            if r.random() < 0.5:
                words[r.randrange(len(words))] = r.choice(VOCAB)
            else:
                words.insert(r.randrange(len(words)), r.choice(VOCAB))
        planted.append((i, len(texts)))
        texts.append(" ".join(words))
    examples = [Example(line=n + 1, prompt=t, completion="x") for n, t in enumerate(texts)]
    sets = [shingles(words_of(normalise(example_parts(ex)[2]))) for ex in examples]
    truth = {(i, j) for i, j in planted if jaccard(sets[i], sets[j]) >= NEAR_THRESHOLD}
    (near,) = [f for f in check_data([Source("train", "g", examples)], LEVELS).findings if f.kind == "near_duplicates"]
    row = lambda ref: int(ref.split(":")[1]) - 1  # noqa: E731
    reported = {tuple(sorted((row(a), row(b)))) for occ in near.occurrences for a, b, _ in occ["pairs"]}
    grouped = set()  # what a reader of the report takes as near duplicates: any two examples of one group
    for occ in near.occurrences:
        rows = sorted(row(ref) for ref in occ["examples"])
        grouped |= {(a, b) for n, a in enumerate(rows) for b in rows[n + 1:]}
    similar = lambda pairs: {p for p in pairs if jaccard(sets[p[0]], sets[p[1]]) >= NEAR_THRESHOLD}  # noqa: E731
    precision = len(similar(reported)) / len(reported)
    group_precision = len(similar(grouped)) / len(grouped)
    recall = len(truth & grouped) / len(truth)
    with capsys.disabled():
        print(f"\nnear duplicates: {len(truth)} true pairs of {len(planted)} planted; reported {len(reported)} pairs "
              f"in {len(near.occurrences)} groups: precision {precision:.3f} (pairs), {group_precision:.3f} (any two "
              f"of a group), recall {recall:.3f}")
    assert 100 < len(truth) < 400  # the set has pairs on both sides of the threshold
    assert precision >= 0.99 and group_precision >= 0.9 and recall >= 0.95


def test_data_check_command_with_splits_checks_and_json(tmp_path, capsys):
    from lorafuse.engine.cli import main

    train = [pc(sentence(), "a") for _ in range(60)]
    train[5] = pc("contact: ana@example.com", "ok")
    paths = {s: write(tmp_path / f"{s}.jsonl", rows, crlf=True)
             for s, rows in (("train", train), ("test", [dict(train[1])]), ("validation", [pc(sentence(), "a")]))}
    out_json = tmp_path / "report.json"
    argv = ["data", "check", str(paths["train"]), "--validation", str(paths["validation"]), "--test",
            str(paths["test"]), "--json", str(out_json)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "refuse: test_leakage: 1 of 1 test examples also occur in train: 1 exactly" in out
    assert f"{paths['test']}:1 = {paths['train']}:2" in out
    assert "train would not start: test_leakage" in out and "ana@example.com" not in out
    report = json.loads(out_json.read_text())
    assert report["refused"] == ["test_leakage"] and [f["examples"] for f in report["files"]] == [60, 1, 1]
    assert "ana@example.com" not in out_json.read_text()
    assert main([*argv, "--check", "test_leakage=warn"]) == 0
    assert main([*argv, "--check", "leakage=warn"]) == 2
    assert "unknown config key 'data.checks.leakage'" in capsys.readouterr().err
