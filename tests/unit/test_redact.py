from __future__ import annotations

import base64
import hashlib
import itertools
import json
import random
import string
import urllib.parse
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildcell.errors import ConfigError
from buildcell.redact import (
    MIN_SECRET_LENGTH,
    REPLACEMENT,
    Redactor,
    Scanner,
    Secret,
    encodings,
    scan,
)

B64 = {"standard": base64.b64encode, "urlsafe": base64.urlsafe_b64encode}


def forms_of(secrets: Sequence[Secret]) -> set[bytes]:
    return set().union(*(encodings(s.reveal()) for s in secrets))


def naive_redact(data: bytes, secrets: Sequence[Secret]) -> bytes:
    """The specification: the union of all occurrences, one ``***`` per covered range."""
    spans = []
    for form in forms_of(secrets):
        at = data.find(form)
        while at >= 0:
            spans.append((at, at + len(form)))
            at = data.find(form, at + 1)
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, pos = bytearray(), 0
    for start, end in merged:
        out += data[pos:start] + REPLACEMENT
        pos = end
    return bytes(out + data[pos:])


def chunks(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def stream(redactor: Redactor, pieces: Sequence[bytes]) -> bytes:
    return b"".join(redactor.feed(piece) for piece in pieces) + redactor.flush()


def assert_redacted(text: bytes, secret: Secret) -> bytes:
    forms = encodings(secret.reveal())
    assert any(form in text for form in forms), "test input does not carry the secret"
    redacted = Redactor([secret]).redact(text)
    assert not [form for form in forms if form in redacted]
    assert REPLACEMENT in redacted
    return redacted


# --- encodings ----------------------------------------------------------------------------


def test_encodings_lists_every_form() -> None:
    value = b'hun"ter 2/x'
    forms = encodings(value)
    assert value in forms
    assert value.hex().encode() in forms
    assert value.hex().upper().encode() in forms
    assert base64.b64encode(value) in forms
    assert base64.b64encode(value).rstrip(b"=") in forms
    assert base64.urlsafe_b64encode(value) in forms
    assert urllib.parse.quote(value, safe="").encode() in forms
    assert urllib.parse.quote_plus(value, safe="").encode() in forms
    assert json.dumps(value.decode())[1:-1].encode() in forms
    assert all(len(form) >= MIN_SECRET_LENGTH for form in forms)


@pytest.mark.parametrize("offset", [0, 1, 2])
@pytest.mark.parametrize("alphabet", sorted(B64))
def test_encodings_include_the_stable_base64_core_at_every_offset(
    offset: int, alphabet: str
) -> None:
    value = bytes(range(200, 230))
    encoded = B64[alphabet](b"\0" * offset + value)
    core = encoded[-(-8 * offset // 6) : 8 * (offset + len(value)) // 6]
    assert core in encodings(value)


def test_encodings_of_a_plain_value_have_no_redundant_escapes() -> None:
    value = b"plain-token_1234"
    forms = encodings(value)
    assert urllib.parse.quote(value, safe="").encode() == value
    assert json.dumps(value.decode())[1:-1].encode() == value
    assert forms.isdisjoint({b"", b"plain", b"1234"})


def test_encodings_of_a_multiline_value_include_each_long_line() -> None:
    value = b"-----BEGIN KEY-----\r\nMIIEvQIBADANBgkq\r\nab\r\n-----END KEY-----\r\n"
    forms = encodings(value)
    assert {b"-----BEGIN KEY-----", b"MIIEvQIBADANBgkq", b"-----END KEY-----"} <= forms
    assert b"ab" not in forms
    assert not any(form.endswith(b"\r") for form in forms if b"\n" not in form)


# --- Secret -------------------------------------------------------------------------------


def test_short_secret_is_refused_without_showing_its_value() -> None:
    with pytest.raises(ConfigError) as excinfo:
        Secret("token", b"x9q")
    message = str(excinfo.value)
    assert message == (
        "secret 'token' is shorter than 4 bytes: it cannot be redacted without destroying output"
    )
    assert "x9q" not in message
    assert "x9q" not in (excinfo.value.hint or "")
    assert "x9q" not in repr(excinfo.value)
    assert excinfo.value.exit_code == 125


def test_secret_repr_and_str_never_show_the_value() -> None:
    secret = Secret("token", b"s3cr3t-value")
    assert repr(secret) == "Secret(name='token')"
    assert str(secret) == "Secret(name='token')"
    assert "s3cr3t" not in f"{secret} {secret!r} {[secret]}"
    assert secret.reveal() == b"s3cr3t-value"
    assert secret.name == "token"


# --- Redactor: each encoding --------------------------------------------------------------


def test_raw_secret_is_redacted() -> None:
    secret = Secret("token", b"ghp_abcdefghij0123456789")
    redacted = assert_redacted(b"Authorization: token ghp_abcdefghij0123456789\n", secret)
    assert redacted == b"Authorization: token ***\n"


@pytest.mark.parametrize("offset", [0, 1, 2])
@pytest.mark.parametrize("alphabet", sorted(B64))
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("seed", range(8))
def test_base64_secret_is_redacted_at_any_offset_in_a_longer_stream(
    offset: int, alphabet: str, padded: bool, seed: int
) -> None:
    rng = random.Random(f"{seed}-{offset}-{alphabet}")
    value = rng.randbytes(rng.randint(4, 40))
    prefix = rng.randbytes(offset + 3 * rng.randint(0, 3))
    suffix = rng.randbytes(rng.choice([0, 0, 1, 2, 3, 7]))
    encoded = B64[alphabet](prefix + value + suffix)
    if not padded:
        encoded = encoded.rstrip(b"=")
    text = b"header: " + encoded + b"\nnext line\n"
    redacted = assert_redacted(text, Secret("blob", value))
    assert redacted.startswith(b"header: ")
    assert redacted.endswith(b"\nnext line\n")


@pytest.mark.parametrize("alphabet", sorted(B64))
def test_base64_of_the_secret_alone_is_redacted_whole(alphabet: str) -> None:
    value = b"user:pa55word?>"
    text = b"Authorization: Basic " + B64[alphabet](value) + b"\n"
    assert Redactor([Secret("basic", value)]).redact(text) == b"Authorization: Basic ***\n"


@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_hex_secret_is_redacted(case: Callable[[str], str]) -> None:
    value = bytes(range(0, 250, 7))
    text = b"key=" + case(value.hex()).encode() + b";"
    assert assert_redacted(text, Secret("key", value)) == b"key=***;"


@pytest.mark.parametrize("quote", [urllib.parse.quote, urllib.parse.quote_plus])
def test_percent_encoded_secret_is_redacted(quote: Callable[..., str]) -> None:
    value = b"p@ss w/rd&x=1"
    text = b"GET https://user:" + quote(value, safe="").encode() + b"@example.org/ HTTP/1.1"
    redacted = assert_redacted(text, Secret("password", value))
    assert redacted == b"GET https://user:***@example.org/ HTTP/1.1"


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_json_escaped_secret_is_redacted(ensure_ascii: bool) -> None:
    value = 'pa"ss\\wo\nrd\t-é-✓'.encode()
    text = json.dumps({"password": value.decode(), "user": "me"}, ensure_ascii=ensure_ascii)
    redacted = assert_redacted(text.encode(), Secret("password", value))
    assert redacted == b'{"password": "***", "user": "me"}'


def test_json_escaped_binary_secret_is_redacted() -> None:
    value = b"\xff\xfe-not-utf8-\x00\x01"
    text = json.dumps({"k": value.decode("utf-8", "surrogateescape")}).encode()
    assert assert_redacted(text, Secret("bin", value)) == b'{"k": "***"}'


def test_multiline_secret_is_redacted_line_by_line() -> None:
    value = b"-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0B\nAQEFAASC\n-----END KEY-----\n"
    text = b"+ echo\nlog: MIIEvQIBADANBgkqhkiG9w0B\r\nlog: AQEFAASC\nok\n"
    assert assert_redacted(text, Secret("key", value)) == b"+ echo\nlog: ***\r\nlog: ***\nok\n"


# --- Redactor: semantics ------------------------------------------------------------------


def test_overlapping_and_adjacent_occurrences_become_one_replacement() -> None:
    redactor = Redactor([Secret("a", b"abcdef"), Secret("b", b"defghi"), Secret("c", b"WXYZ")])
    assert redactor.redact(b"<abcdefghi>") == b"<***>"
    assert redactor.redact(b"<abcdefWXYZdefghi>") == b"<***>"
    assert redactor.redact(b"<abcdef-WXYZ>") == b"<***-***>"
    assert redactor.redact(b"abcdefabcdef") == b"***"


def test_output_without_secrets_passes_through_unchanged() -> None:
    data = bytes(range(256)) * 64
    redactor = Redactor([Secret("token", b"s3cr3t-token-value")])
    assert redactor.redact(data) == data
    assert stream(redactor, chunks(data, range(0, len(data), 77))) == data


def test_redactor_without_secrets_passes_everything_through() -> None:
    redactor = Redactor([])
    assert redactor.max_pattern == 0
    assert redactor.feed(b"abc") == b"abc"
    assert redactor.flush() == b""
    assert redactor.redact(b"xyz") == b"xyz"


def test_max_pattern_is_the_longest_form() -> None:
    value = b"s3cr3t-token-value"
    assert Redactor([Secret("t", value)]).max_pattern == max(map(len, encodings(value)))


def test_feed_keeps_back_only_what_could_start_a_secret() -> None:
    redactor = Redactor([Secret("token", b"s3cr3t-token-value")])
    assert redactor.feed(b"hello\n") == b"hello\n"
    assert redactor.feed(b"x s3cr3t-to") == b"x "
    assert redactor.feed(b"ken-value!") == b"***!"
    assert redactor.feed(b"s3cr3t") == b""
    assert redactor.flush() == b"s3cr3t"


def test_feed_accepts_any_bytes_like_chunk_and_starts_over_after_flush() -> None:
    redactor = Redactor([Secret("token", b"s3cr3t-token-value")])
    out = redactor.feed(bytearray(b"a s3cr3t-tok")) + redactor.feed(memoryview(b"en-value b"))
    assert out + redactor.flush() == b"a *** b"
    assert stream(redactor, [b"s3cr3t-token-value"]) == b"***"


def test_a_long_run_of_overlapping_occurrences_is_one_replacement() -> None:
    data = b"<" + b"a" * 200_000 + b">"
    redactor = Redactor([Secret("a", b"aaaa")])
    assert redactor.redact(data) == b"<***>"
    pieces = chunks(data, range(4096, len(data), 4096))
    outputs = [redactor.feed(piece) for piece in pieces]
    assert b"".join(outputs) + redactor.flush() == b"<***>"
    assert outputs[0] == b"<***"  # the replacement is not held back with the run


def test_large_stream_keeps_back_at_most_max_pattern_minus_one_bytes() -> None:
    rng = random.Random(7)
    value = b"s3cr3t-token-value"
    redactor = Redactor([Secret("token", value)])
    data = rng.randbytes(1 << 16) + value[:-1]
    out = redactor.feed(data)
    assert len(out) >= len(data) - (redactor.max_pattern - 1)
    assert out == data[: len(out)]


def test_hex_heavy_output_is_redacted_exactly() -> None:
    # Hex digests hit the 4-byte blocks of hex forms often, which makes the search switch
    # between its samplings; the result must not depend on that.
    rng = random.Random(3)
    secrets = [Secret(f"s{i}", rng.randbytes(rng.randint(20, 40))) for i in range(20)]
    forms = sorted(forms_of(secrets))
    lines = []
    for i in range(6000):
        lines.append(b"sha256:" + hashlib.sha256(b"%d" % i).hexdigest().encode() + b"\n")
        if i % 500 == 0:
            lines.append(b"leak " + rng.choice(forms) + b"\n")
    data = b"".join(lines)
    redactor = Redactor(secrets)
    expected = naive_redact(data, secrets)
    assert expected.count(REPLACEMENT) == 12
    assert redactor.redact(data) == expected
    assert stream(redactor, chunks(data, range(4096, len(data), 4096))) == expected


@pytest.mark.parametrize("output", ["text", "binary"])
def test_binary_secrets_are_redacted_exactly_in_text_and_binary_output(output: str) -> None:
    # Binary forms are found by their rare bytes in text output, by sampling in binary.
    rng = random.Random(output)
    values = [rng.randbytes(rng.randint(20, 40)) for _ in range(30)]
    values.append(b"\x00line-one-of-key\nx\x01y\nthird-line\xc3\xa9\xff")
    secrets = make_secrets(values)
    forms = sorted(forms_of(secrets))
    alphabet = string.printable.encode() if output == "text" else bytes(range(256))
    parts = []
    for _ in range(40):
        parts.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 3000))))
        parts.append(rng.choice(forms))
    data = b"".join(parts)
    redactor = Redactor(secrets)
    expected = naive_redact(data, secrets)
    assert redactor.redact(data) == expected
    assert stream(redactor, chunks(data, range(8192, len(data), 8192))) == expected
    assert stream(redactor, chunks(data, range(61, len(data), 61))) == expected


# --- Redactor: properties -----------------------------------------------------------------

values = st.binary(min_size=MIN_SECRET_LENGTH, max_size=64).filter(lambda v: b"*" not in v)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    """Secrets, a stream that carries them in various forms, and where to cut it."""
    secret_values = draw(st.lists(values, min_size=1, max_size=3, unique=True))
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["junk", "text", "form", "base64"]))
        if kind == "junk":
            parts.append(draw(st.binary(max_size=40)))
        elif kind == "text":
            parts.append(draw(st.text(max_size=40)).encode())
        else:
            value = draw(st.sampled_from(secret_values))
            if kind == "form":
                parts.append(draw(st.sampled_from(sorted(encodings(value)))))
            else:
                prefix, suffix = draw(st.binary(max_size=5)), draw(st.binary(max_size=5))
                encoded = B64[draw(st.sampled_from(sorted(B64)))](prefix + value + suffix)
                parts.append(encoded.rstrip(b"=") if draw(st.booleans()) else encoded)
    data = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return secret_values, data, cuts


def make_secrets(secret_values: Sequence[bytes]) -> list[Secret]:
    return [Secret(f"s{i}", value) for i, value in enumerate(secret_values)]


@settings(deadline=None, max_examples=300)
@given(scenarios())
def test_no_form_survives_and_chunking_does_not_matter(
    scenario: tuple[list[bytes], bytes, list[int]],
) -> None:
    secret_values, data, cuts = scenario
    secrets = make_secrets(secret_values)
    redactor = Redactor(secrets)
    whole = redactor.redact(data)
    assert whole == naive_redact(data, secrets)
    assert stream(redactor, chunks(data, cuts)) == whole
    assert not [form for form in forms_of(secrets) if form in whole]


@settings(deadline=None)
@given(
    st.lists(values, min_size=1, max_size=3),
    st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)),
    st.lists(st.integers(0, 300), max_size=12),
)
def test_output_without_secrets_passes_unchanged_under_any_chunking(
    secret_values: list[bytes], data: bytes, cuts: list[int]
) -> None:
    secrets = make_secrets(secret_values)
    if any(form in data for form in forms_of(secrets)):
        return
    redactor = Redactor(secrets)
    assert redactor.redact(data) == data
    assert stream(redactor, chunks(data, [c for c in cuts if c <= len(data)])) == data


@settings(deadline=None)
@given(st.lists(values, min_size=1, max_size=4), st.binary(min_size=1, max_size=100))
def test_every_byte_split_matches_the_whole(secret_values: list[bytes], junk: bytes) -> None:
    secrets = make_secrets(secret_values)
    data = junk + b"".join(sorted(encodings(secret_values[0]))[:3]) + junk
    redactor = Redactor(secrets)
    assert stream(redactor, [bytes([b]) for b in data]) == redactor.redact(data)


def test_hex_heavy_output_switches_to_wide_blocks_and_still_redacts() -> None:
    # 4-byte blocks of hex output keep hitting the blocks of the secrets' hex forms; the
    # redactor then searches with 8-byte blocks for a while. Nothing may slip through.
    rng = random.Random(7)
    secrets = [Secret(f"s{i}", rng.randbytes(12)) for i in range(100)]
    redactor = Redactor(secrets)
    plan = redactor._index._unanchored  # hex output has no anchor bytes
    assert plan._fallback_plan is not None and plan._fallback is None  # built lazily
    junk = rng.randbytes(1 << 15).hex().encode()
    out = redactor.feed(junk)
    for i, secret in enumerate(secrets):
        out += redactor.feed(junk[: 1000 + i] + secret.reveal().hex().encode() + b"|")
    out += redactor.flush()
    assert plan._fallback is not None
    assert out.count(b"***|") == len(secrets)
    for secret in secrets:
        assert secret.reveal().hex().encode() not in out


def test_fresh_redactors_share_the_index_but_not_the_stream() -> None:
    secret = Secret("token", b"s3cr3t-token-value")
    first = Redactor([secret])
    second = first.fresh()
    # Interleaved halves of a secret in each stream: neither stream sees the other's carry.
    out1 = first.feed(b"a: s3cr3t-tok")
    out2 = second.feed(b"b: s3cr3t-")
    out1 += first.feed(b"en-value.") + first.flush()
    out2 += second.feed(b"token-value!") + second.flush()
    assert (out1, out2) == (b"a: ***.", b"b: ***!")
    assert second.max_pattern == first.max_pattern


# --- Scanner and scan ---------------------------------------------------------------------


def test_scanner_finds_secrets_across_chunk_boundaries() -> None:
    present = Secret("present", b"s3cr3t-token-value")
    encoded = Secret("encoded", b"another-s3cret")
    absent = Secret("absent", b"never-printed-value")
    data = b"x" * 100 + b"s3cr3t-token-value" + b"y" * 50 + base64.b64encode(b"another-s3cret")
    for size in (1, 3, 7, 64, len(data)):
        scanner = Scanner([present, encoded, absent])
        for piece in chunks(data, range(0, len(data), size)):
            scanner.feed(piece)
        assert scanner.found == {"present", "encoded"}


def test_every_form_is_found_when_split_at_any_point() -> None:
    secret = Secret("token", 'p"w d\\é-\x00x'.encode())
    for form in sorted(encodings(secret.reveal())):
        for cut in range(1, len(form)):
            scanner = Scanner([secret])
            scanner.feed(b"<<" + form[:cut])
            scanner.feed(form[cut:] + b">>")
            assert scanner.found == {"token"}, (form, cut)
            redactor = Redactor([secret])
            assert stream(redactor, [b"<<" + form[:cut], form[cut:] + b">>"]) == b"<<***>>"


def test_scanner_reports_nothing_when_no_secret_occurs() -> None:
    scanner = Scanner([Secret("absent", b"never-printed-value")])
    scanner.feed(b"never-printed-valu")
    scanner.feed(b"E and more")
    assert scanner.found == set()


def test_scan_names_secrets_in_the_order_given() -> None:
    a, b, c = Secret("a", b"aaaa-value"), Secret("b", b"bbbb-value"), Secret("c", b"cccc-value")
    data = bytearray(b"-- " + b"cccc-value".hex().encode() + b" -- aaaa-value --")
    assert scan(bytes(data), [a, b, c]) == ["a", "c"]
    assert scan(memoryview(data), [c, b, a]) == ["c", "a"]
    assert scan(b"", [a]) == []
    assert scan(b"nothing here", []) == []


def test_scan_reads_large_data_in_slices_without_missing_a_boundary() -> None:
    value = b"s3cr3t-token-value"
    data = bytearray(3 << 20)
    data[(1 << 20) - 5 : (1 << 20) - 5 + len(value)] = value
    assert scan(memoryview(data), [Secret("t", value), Secret("u", b"other-value")]) == ["t"]


@settings(deadline=None)
@given(scenarios())
def test_scanner_agrees_with_a_naive_search(
    scenario: tuple[list[bytes], bytes, list[int]],
) -> None:
    secret_values, data, cuts = scenario
    secrets = make_secrets(secret_values)
    expected = {s.name for s in secrets if any(f in data for f in encodings(s.reveal()))}
    scanner = Scanner(secrets)
    for piece in chunks(data, cuts):
        scanner.feed(piece)
    assert scanner.found == expected
    assert scan(data, secrets) == [s.name for s in secrets if s.name in expected]
