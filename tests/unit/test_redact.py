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


ESC = 0x1B
SPREAD = 64  # an interleaved occurrence covers at most this many times its length


def sequence_length(data: bytes, at: int) -> int:
    """The length of the escape sequence that starts at ``data[at]``, 0 if none does.

    The specification, written out byte by byte: CSI (``ESC [``, up to 1024 parameter and
    16 intermediate bytes, a final byte), strings (``ESC ]``, ``P``, ``X``, ``^``, ``_``,
    up to 1024 bytes other than BEL and ESC, then BEL or ``ESC \\``), ``ESC``, up to 16
    intermediates and a final byte, and the other two-byte sequences.
    """

    def run(i: int, low: int, high: int) -> int:
        j = i
        while j < len(data) and low <= data[j] <= high:
            j += 1
        return j

    if data[at] != ESC or at + 1 >= len(data):
        return 0
    kind = data[at + 1]
    if kind == ord("["):
        params = run(at + 2, 0x30, 0x3F)
        inter = run(params, 0x20, 0x2F)
        if params - at - 2 > 1024 or inter - params > 16 or inter >= len(data):
            return 0
        return inter + 1 - at if 0x40 <= data[inter] <= 0x7E else 0
    if kind in b"]PX^_":
        j = at + 2
        while j < len(data) and data[j] not in (0x07, ESC):
            j += 1
        if j - at - 2 > 1024 or j >= len(data):
            return 0
        if data[j] == 0x07:
            return j + 1 - at
        return j + 2 - at if data[j + 1 : j + 2] == b"\\" else 0
    if 0x20 <= kind <= 0x2F:
        inter = run(at + 1, 0x20, 0x2F)
        if inter - at - 1 > 16 or inter >= len(data):
            return 0
        return inter + 1 - at if 0x30 <= data[inter] <= 0x7E else 0
    return 2 if 0x30 <= kind <= 0x7E else 0


def sequences(data: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of every escape sequence in ``data``, left to right."""
    found, at = [], 0
    while at < len(data):
        length = sequence_length(data, at)
        if length:
            found.append((at, at + length))
            at += length
        else:
            at += 1
    return found


def shown(data: bytes) -> tuple[bytes, list[int]]:
    """``data`` as a terminal shows it, and where each shown byte is in ``data``."""
    hidden = {i for start, end in sequences(data) for i in range(start, end)}
    where = [i for i in range(len(data)) if i not in hidden]
    return bytes(data[i] for i in where), where


def text_part(data: bytes) -> bytes:
    """What of scanned ``data`` is text: all of it, or what comes before a zero byte among
    its first 8000 bytes (binary from there on)."""
    binary = data.find(b"\0", 0, 8000)
    return data if binary < 0 else data[:binary]


def naive_spans(
    data: bytes, secrets: Sequence[Secret], *, scanned: bool = False
) -> list[tuple[int, int]]:
    """Every range the specification redacts: the occurrences of every form as they are
    (widened to a sequence other than a string that one starts inside) and as shown
    (spanning escape sequences, over at most SPREAD times the form's length). A scan
    sees them as shown only in what is text."""
    text_data = text_part(data) if scanned else data
    held = {i: (s, e) for s, e in sequences(text_data) for i in range(s + 1, e)}
    text, where = shown(text_data)
    spans = []
    for form in forms_of(secrets):
        at = data.find(form)
        while at >= 0:
            start, end = held.get(at, (at, at))
            if start == at or data[start + 1] in b"]PX^_":
                spans.append((at, at + len(form)))
            else:
                spans.append((start, max(end, at + len(form))))
            at = data.find(form, at + 1)
        at = text.find(form)
        while at >= 0:
            first, last = where[at], where[at + len(form) - 1] + 1
            if len(form) < last - first <= SPREAD * len(form):
                spans.append((first, last))
            at = text.find(form, at + 1)
    return spans


def naive_redact(data: bytes, secrets: Sequence[Secret]) -> bytes:
    """The specification: the union of all occurrences, one ``***`` per covered range."""
    merged: list[list[int]] = []
    for start, end in sorted(naive_spans(data, secrets)):
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
    """Redact ``text``, which carries ``secret``, and check that no form of it is left,
    in the bytes or as a terminal shows them."""
    forms = encodings(secret.reveal())
    views = (text, shown(text)[0])
    assert any(form in view for form in forms for view in views), "the input lacks the secret"
    redacted = Redactor([secret]).redact(text)
    views = (redacted, shown(redacted)[0])
    assert not [form for form in forms for view in views if form in view]
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


def utf16(text: str, codec: str) -> bytes:
    """``text`` in UTF-16 without a zero byte at either end, as :func:`encodings` has it."""
    form = text.encode(codec)
    return form[form[0] == 0 : len(form) - (form[-1] == 0)]


def test_encodings_include_utf16_in_both_byte_orders() -> None:
    forms = encodings(b"hunter2-token")
    assert utf16("hunter2-token", "utf-16-le") in forms
    assert utf16("hunter2-token", "utf-16-be") in forms
    # Below U+0100 both byte orders are the same bytes but for the zero byte at one end.
    assert utf16("hunter2-token", "utf-16-le") == "hunter2-token".encode("utf-16-le")[:-1]
    assert utf16("hunter2-token", "utf-16-be") == "hunter2-token".encode("utf-16-be")[1:]
    assert not any(form.startswith((b"\xff\xfe", b"\xfe\xff")) for form in forms)  # no BOM


def test_encodings_of_non_ascii_values_include_utf16_of_the_text_and_of_the_bytes() -> None:
    text = "✓-pässwörd-秘密"
    forms = encodings(text.encode())
    for codec in ("utf-16-le", "utf-16-be"):
        assert text.encode(codec) in forms  # the value read as UTF-8: no zero byte at an end
        assert utf16(text.encode().decode("latin-1"), codec) in forms  # byte for byte
    binary = b"\xff\x00\xfe\x80-key"
    assert utf16(binary.decode("latin-1"), "utf-16-le") in encodings(binary)
    assert utf16(binary.decode("latin-1"), "utf-16-be") in encodings(binary)


def test_encodings_of_a_multiline_value_include_utf16_of_each_long_line() -> None:
    forms = encodings(b"first-line\r\nsecond-line\nab\n")
    for line in ("first-line", "second-line"):
        assert utf16(line, "utf-16-le") in forms
        assert utf16(line, "utf-16-be") in forms
    assert utf16("ab", "utf-16-le") not in forms


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


@pytest.mark.parametrize(("codec", "bom"), [("utf-16-le", b""), ("utf-16-be", b"\xfe\xff")])
@pytest.mark.parametrize("value", ["ghp_abcdefghij0123456789", "pässwörd-✓-秘密"])
def test_utf16_secret_is_redacted_in_utf16_output(codec: str, bom: bytes, value: str) -> None:
    # What a Windows tool, or a Java or JavaScript program dumping a string, writes.
    before, after = bom + "token=".encode(codec), ";\r\n".encode(codec)
    text = before + value.encode(codec) + after
    secret = Secret("token", value.encode())
    # The characters around the value are left whole: only the zero half of a first or
    # last character below U+0100 is left of the value.
    expected = before + value.encode(codec).replace(utf16(value, codec), REPLACEMENT) + after
    assert assert_redacted(text, secret) == expected
    if value.isascii():
        assert len(expected) % 2 == 0
        assert expected.decode(codec).endswith(after.decode(codec))
    for cut in range(len(text) + 1):
        assert stream(Redactor([secret]), [text[:cut], text[cut:]]) == expected


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_secret_is_redacted_at_an_odd_offset_in_text_output(codec: str) -> None:
    value = "s3cr3t-token-value"
    text = b"log: \x01" + value.encode(codec) + b" done\n"
    redacted = assert_redacted(text, Secret("t", value.encode()))
    assert redacted == b"log: \x01" + value.encode(codec).replace(utf16(value, codec), b"***") + (
        b" done\n"
    )


def test_utf16_output_full_of_zero_bytes_is_searched_by_sampling_and_redacted_exactly() -> None:
    # UTF-16 text is half zero bytes: far too many to find the UTF-16 forms by their zero
    # bytes, so all forms are found by sampling blocks; none may slip between them.
    rng = random.Random(5)
    secrets = [Secret(f"s{i}", rng.randbytes(rng.randint(4, 30)).hex().encode()) for i in range(8)]
    redactor = Redactor(secrets)
    assert redactor._index._anchors is not None
    lines = []
    for i in range(400):
        lines.append(f"line {i}: {rng.choice(string.ascii_letters) * rng.randint(0, 60)}\n")
        if i % 40 == 0:
            lines.append(f"key {rng.choice(secrets).reveal().decode()}\n")
    for codec in ("utf-16-le", "utf-16-be"):
        data = "".join(lines).encode(codec)
        assert not redactor._index._anchors.search(data, set())  # too many zero bytes
        expected = naive_redact(data, secrets)
        assert expected.count(REPLACEMENT) == 10
        assert redactor.redact(data) == expected
        assert stream(redactor, chunks(data, range(999, len(data), 999))) == expected


def test_utf16_forms_of_ascii_secrets_cost_one_memchr_in_text_output() -> None:
    # The UTF-16 forms of ASCII secrets all hold zero bytes, which text output lacks:
    # they are ruled out by looking for that one byte, not by another pass over the text.
    redactor = Redactor([Secret("a", b"s3cr3t-token-value"), Secret("b", b"AKIAEXAMPLE12345")])
    index = redactor._index
    assert index._anchors is not None and index._anchors._few == (0,)
    utf16_forms = {p for p in index.names if b"\0" in p}
    assert utf16_forms == {
        utf16(v, "utf-16-le") for v in ("s3cr3t-token-value", "AKIAEXAMPLE12345")
    }
    searched = set(index._unanchored._short)
    if index._unanchored._sampler is not None:
        searched |= {p for hits in index._unanchored._sampler._entries.values() for p, _ in hits}
    assert searched.isdisjoint(utf16_forms)


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


# --- Redactor: escape sequences -----------------------------------------------------------


def interleave(value: bytes, between: Callable[[int], bytes]) -> bytes:
    """``value`` with ``between(i)`` put after its ``i``-th byte, but the last."""
    return b"".join(
        value[i : i + 1] + (between(i) if i < len(value) - 1 else b"") for i in range(len(value))
    )


def test_a_secret_coloured_character_by_character_is_redacted() -> None:
    value = b"SECRET-token-42"
    colours = [b"\x1b[%dm" % (31 + i % 7) for i in range(len(value))]
    text = b"token: " + b"".join(
        c + bytes([v]) + b"\x1b[0m" for c, v in zip(colours, value, strict=True)
    )
    redacted = assert_redacted(text + b"\n", Secret("t", value))
    # The sequences inside the value go with it; those before and after it stay.
    assert redacted == b"token: \x1b[31m***\x1b[0m\n"


@pytest.mark.parametrize(
    "sequence",
    [
        b"\x1b[0m",  # SGR reset
        b"\x1b[1;38;5;196m",  # 256 colours
        b"\x1b[38;2;255;128;0m\x1b[48;2;0;0;0m",  # truecolour, two of them
        b"\x1b[m\x1b[K",  # what gcc prints
        b"\x1b[2C",  # cursor forward
        b"\x1b[?25l",  # private parameter
        b"\x1b]0;a title\x07",  # OSC ended by BEL
        b"\x1b]8;;https://example.org/\x1b\\",  # OSC 8 hyperlink ended by ST
        b"\x1bP1$r0m\x1b\\",  # DCS
        b"\x1b(B",  # character set
        b"\x1b7",  # save the cursor
    ],
)
def test_any_escape_sequence_between_every_character_is_seen_through(sequence: bytes) -> None:
    value = "pa55-wörd_✓".encode()
    text = b"> " + interleave(value, lambda _: sequence) + b" <"
    assert assert_redacted(text, Secret("t", value)) == b"> *** <"


def test_sequences_around_the_value_stay_so_the_output_stays_readable() -> None:
    # gcc colours a quoted word; here the word holds the secret with a highlight in it.
    value = b"hunter2-password"
    shown = b"\x1b[01;35m\x1b[Khunter2-\x1b[01;31m\x1b[Kpass\x1b[m\x1b[Kword\x1b[m\x1b[K"
    text = (
        b"x.c:3:1: \x1b[01;35m\x1b[Kwarning: \x1b[m\x1b[Kunused \xe2\x80\x98"
        + shown
        + b"\xe2\x80\x99\n"
    )
    redacted = assert_redacted(text, Secret("t", value))
    assert redacted == (
        b"x.c:3:1: \x1b[01;35m\x1b[Kwarning: \x1b[m\x1b[Kunused \xe2\x80\x98"
        b"\x1b[01;35m\x1b[K***\x1b[m\x1b[K\xe2\x80\x99\n"
    )


def test_a_value_interleaved_with_sequences_is_redacted_however_the_stream_is_split() -> None:
    value = b"s3cr3t-token"
    codes = [b"\x1b[3%dm" % (i % 8) for i in range(len(value))]
    text = (
        b"\x1b]0;build\x07start "
        + interleave(value, lambda i: codes[i] + (b"\x1b]8;;\x1b\\" if i == 5 else b""))
        + b"\x1b[0m end\n"
    )
    redactor = Redactor([Secret("t", value)])
    expected = b"\x1b]0;build\x07start ***\x1b[0m end\n"
    assert redactor.redact(text) == expected
    assert stream(redactor, [bytes([b]) for b in text]) == expected
    for cut in range(len(text) + 1):
        assert stream(redactor, [text[:cut], text[cut:]]) == expected, cut
    rng = random.Random(11)
    for _ in range(300):
        cuts = rng.sample(range(len(text) + 1), 3)
        assert stream(redactor, chunks(text, cuts)) == expected, cuts


def test_a_value_in_an_osc_string_is_redacted_in_place() -> None:
    value = b"ghp_abcdefghij0123456789"
    text = b"\x1b]8;;https://example.org/?token=" + value + b"&x=1\x1b\\link\x1b]8;;\x1b\\\n"
    assert assert_redacted(text, Secret("t", value)) == (
        b"\x1b]8;;https://example.org/?token=***&x=1\x1b\\link\x1b]8;;\x1b\\\n"
    )


def test_a_value_that_starts_inside_a_sequence_takes_the_sequence_with_it() -> None:
    # A *** inside a CSI would make a terminal take what follows for more of it.
    redactor = Redactor([Secret("t", b"1mABCDEF"), Secret("u", b";5Hxyzw")])
    assert redactor.redact(b"<\x1b[31mABCDEF>") == b"<***>"
    assert redactor.redact(b"<\x1b[3;5Hxyzw>") == b"<***>"


def test_incomplete_malformed_and_overlong_sequences_are_text() -> None:
    value = b"s3cr3t-token"
    redactor = Redactor([Secret("t", value)])
    for text in (
        b"s3cr3t\x1b[31\n-token",  # a CSI broken by a newline: the ESC is shown
        b"s3cr3t\x1b-token",  # an ESC that starts no sequence
        b"s3cr3t\x1b]0;" + b"x" * 1025 + b"\x07-token",  # a string over 1024 bytes
        b"s3cr3t\x1b[" + b"1" * 1025 + b"m-token",  # parameters over 1024 bytes
    ):
        assert redactor.redact(text) == text
        assert stream(redactor, chunks(text, [7, 9, len(text) - 3])) == text
    # At the end of the stream an incomplete sequence is text, flushed as it came.
    for tail in (
        b"\x1b",
        b"\x1b[",
        b"\x1b[31",
        b"\x1b]0;title",
        b"\x1b]0;title\x1b",
        b"\x1b(",
        b"\x1bP",
    ):
        text = b"a \x1b[1ms3cr3t\x1b[0m-token " + tail
        assert stream(redactor, [text]) == b"a \x1b[1m*** " + tail
        assert stream(redactor, [bytes([b]) for b in text]) == b"a \x1b[1m*** " + tail


def test_a_value_spread_over_too_much_output_is_not_taken_for_one() -> None:
    value = b"abcd-efgh"  # 9 bytes: up to 9 * 64 bytes with the sequences between them
    redactor = Redactor([Secret("t", value)])
    fits = interleave(value, lambda _: b"\x1b[0m" * 17)  # 9 + 8 * 68 = 553 bytes
    too_far = interleave(value, lambda _: b"\x1b[0m" * 18)  # 9 + 8 * 72 = 585 bytes
    assert len(fits) <= 64 * len(value) < len(too_far)
    assert redactor.redact(fits) == b"***"
    assert redactor.redact(too_far) == too_far
    for text in (fits, too_far):
        expected = redactor.redact(text)
        assert stream(redactor, [bytes([b]) for b in text]) == expected
        assert stream(redactor, chunks(text, range(0, len(text), 100))) == expected


def test_what_is_kept_back_stays_bounded_among_endless_sequences() -> None:
    value = b"s3cr3t-token"
    redactor = Redactor([Secret("t", value)])
    bound = 64 * redactor.max_pattern + 1100  # a spread-out value, an incomplete sequence
    redactor.feed(b"x s3cr3t-tok")
    out = b""
    for _ in range(2000):
        out += redactor.feed(b"\x1b[1m\x1b[0m\x1b]0;t\x07")
        assert len(redactor._carry) <= bound
    out += redactor.feed(b"en") + redactor.flush()
    assert out.endswith(b"\x1b[0m\x1b]0;t\x07en")  # too far apart to be the secret
    endless = b"\x1b]0;" + b"t" * 5000
    out = redactor.feed(b"x ") + redactor.feed(endless)
    assert len(redactor._carry) == 0  # over 1024 bytes: not a sequence, nothing to keep
    assert out + redactor.flush() == b"x " + endless


def test_output_without_escape_bytes_never_looks_for_sequences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import buildcell.redact as redact_module

    def fail(*_: object) -> None:
        raise AssertionError("looked for escape sequences in output that has none")

    monkeypatch.setattr(redact_module, "_Shown", fail)
    monkeypatch.setattr(redact_module, "_pending", fail)
    monkeypatch.setattr(redact_module, "_sequence_holding", fail)
    secret = Secret("t", b"s3cr3t-token")
    redactor = Redactor([secret])
    data = b"cc -c x.c s3cr3t-token\n" * 1000
    assert stream(redactor, chunks(data, range(0, len(data), 333))) == b"cc -c x.c ***\n" * 1000
    assert scan(data, [secret]) == ["t"]


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


# Secrets as a person or a service picks them: ASCII, or any text (4 to 64 bytes of UTF-8).
text_values = (
    st.one_of(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=4, max_size=64),
        st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=32),
    )
    .map(str.encode)
    .filter(lambda v: 4 <= len(v) <= 64 and b"*" not in v and b"\x1b" not in v)
)

printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
escape_sequences = st.one_of(
    st.lists(st.integers(0, 255), max_size=4).map(
        lambda ps: b"\x1b[" + b";".join(b"%d" % p for p in ps) + b"m"
    ),
    st.tuples(
        st.sampled_from([b"", b"2", b"1;5", b"?25", b"38;2;1;2;3", b" "]),
        st.sampled_from(b"ABCDHJKSTfhlmnqs@~"),
    ).map(lambda t: b"\x1b[" + t[0] + bytes([t[1]])),
    st.tuples(
        st.sampled_from([b"]0;", b"]2;", b"]8;;", b"P", b"_"]),
        printable.map(str.encode),
        st.sampled_from([b"\x07", b"\x1b\\"]),
    ).map(lambda t: b"\x1b" + t[0] + t[1] + t[2]),
    st.sampled_from([b"\x1b(B", b"\x1b)0", b"\x1b#8", b"\x1b7", b"\x1b8", b"\x1bM", b"\x1b="]),
)


@st.composite
def terminal_scenarios(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    """Secrets, and a stream that shows them as a terminal would get them: interleaved
    with escape sequences, in UTF-16, among coloured text, UTF-16 text and junk."""
    secret_values = draw(st.lists(text_values, min_size=1, max_size=2, unique=True))
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(
            st.sampled_from(["coloured", "utf16", "text", "escape", "junk", "cut", "plain"])
        )
        if kind in ("coloured", "utf16", "plain"):
            value = draw(st.sampled_from(secret_values))
            if kind == "utf16":
                text = value.decode()
                parts.append(text.encode(draw(st.sampled_from(["utf-16-le", "utf-16-be"]))))
                continue
            form = value if kind == "plain" else draw(st.sampled_from(sorted(encodings(value))))
            gaps = draw(
                st.lists(
                    st.lists(escape_sequences, max_size=2),
                    min_size=len(form) - 1,
                    max_size=len(form) - 1,
                )
            )

            def between(i: int, gaps: list[list[bytes]] = gaps) -> bytes:
                return b"".join(gaps[i])

            parts.append(interleave(form, between))
        elif kind == "text":
            text = draw(st.text(max_size=30))
            codec = draw(st.sampled_from(["utf-8", "utf-8", "utf-16-le", "utf-16-be"]))
            parts.append(text.encode(codec, "surrogatepass"))
        elif kind == "escape":
            parts.append(b"".join(draw(st.lists(escape_sequences, max_size=3))))
        elif kind == "junk":
            parts.append(draw(st.binary(max_size=20)))
        else:  # the start of a sequence that something else interrupts
            parts.append(draw(st.sampled_from([b"\x1b", b"\x1b[3", b"\x1b]0;ti", b"\x1b("])))
    data = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=10))
    return secret_values, data, cuts


@settings(deadline=None, max_examples=400)
@given(terminal_scenarios())
def test_no_secret_survives_as_shown_on_a_terminal_or_in_utf16_however_split(
    scenario: tuple[list[bytes], bytes, list[int]],
) -> None:
    secret_values, data, cuts = scenario
    secrets = make_secrets(secret_values)
    redactor = Redactor(secrets)
    whole = redactor.redact(data)
    assert whole == naive_redact(data, secrets)
    assert stream(redactor, chunks(data, cuts)) == whole
    for view in (whole, shown(whole)[0]):
        assert not [form for form in forms_of(secrets) if form in view]
    for value in secret_values:
        for codec in ("utf-16-le", "utf-16-be"):
            assert value.decode().encode(codec) not in whole


@settings(deadline=None, max_examples=200)
@given(terminal_scenarios())
def test_coloured_and_utf16_output_without_secrets_passes_unchanged(
    scenario: tuple[list[bytes], bytes, list[int]],
) -> None:
    secret_values, data, cuts = scenario
    # Other secrets than those the stream carries: mostly, nothing is to be redacted.
    secrets = make_secrets([v[::-1] + b"~" for v in secret_values])
    if naive_spans(data, secrets):
        return
    redactor = Redactor(secrets)
    assert redactor.redact(data) == data
    assert stream(redactor, chunks(data, cuts)) == data


@settings(deadline=None, max_examples=200)
@given(terminal_scenarios())
def test_scanner_finds_secrets_shown_on_a_terminal_or_in_utf16(
    scenario: tuple[list[bytes], bytes, list[int]],
) -> None:
    secret_values, data, cuts = scenario
    secrets = make_secrets(secret_values)
    scanner = Scanner(secrets)
    for piece in chunks(data, cuts):
        scanner.feed(piece)
    assert scanner.found == {s.name for s in secrets if naive_spans(data, [s], scanned=True)}


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
    # The same (cached) plan, read again: mypy would keep ``_fallback`` narrowed to None.
    plan = redactor._index._unanchored
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


@pytest.mark.parametrize(
    "shown",
    [
        "s3cr3t-tøken".encode("utf-16-le"),
        b"\xfe\xff" + "s3cr3t-tøken".encode("utf-16-be"),
        interleave("s3cr3t-tøken".encode(), lambda i: b"\x1b[3%dm" % (i % 8)),
        interleave(b"s3cr3t-t\xc3\xb8ken", lambda i: b"\x1b]8;;x\x1b\\" if i % 3 else b""),
    ],
)
def test_scanner_finds_utf16_and_coloured_values_split_at_any_point(shown: bytes) -> None:
    # Outputs and caches are checked with the Scanner: a UTF-16 copy, or a log file with
    # the colours a terminal would have shown, must not get through either.
    secret = Secret("token", "s3cr3t-tøken".encode())
    data = b"<<" + shown + b">>"
    for cut in range(len(data) + 1):
        scanner = Scanner([secret])
        scanner.feed(data[:cut])
        scanner.feed(data[cut:])
        assert scanner.found == {"token"}, cut
    assert scan(memoryview(data), [secret]) == ["token"]


def test_a_scan_sees_through_escape_sequences_in_text_but_not_in_binary_data() -> None:
    # Binary as git tells it: a zero byte among the first 8000 bytes. Its ESC bytes start
    # sequences only by chance; every form is still looked for as it is.
    secret = Secret("token", b"s3cr3t-token")
    coloured = interleave(b"s3cr3t-token", lambda _: b"\x1b[1m")
    assert scan(b"log: " + coloured, [secret]) == ["token"]
    assert scan(b"log: " + coloured + b"\0", [secret]) == ["token"]  # text up to the zero
    assert scan(b"\0" * 100 + coloured, [secret]) == []
    assert scan(b"\0" * 100 + b"s3cr3t-token".hex().encode(), [secret]) == ["token"]
    assert scan(b"x" * 8000 + b"\0" + coloured, [secret]) == ["token"]  # a late zero byte
    for size in (1, 7, 100, 4096):
        scanner = Scanner([secret])
        data = b"\0" * 100 + coloured
        for piece in chunks(data, range(size, len(data), size)):
            scanner.feed(piece)
        assert scanner.found == set()


def test_redacted_output_is_seen_as_shown_on_a_terminal_even_after_a_zero_byte() -> None:
    # A terminal ignores zero bytes: what a cell prints is never taken for binary.
    coloured = interleave(b"s3cr3t-token", lambda _: b"\x1b[1m")
    redactor = Redactor([Secret("token", b"s3cr3t-token")])
    assert redactor.redact(b"\0\0 " + coloured + b"\n") == b"\0\0 ***\n"
    assert stream(redactor, [b"\0\0 ", coloured[:5], coloured[5:], b"\n"]) == b"\0\0 ***\n"


def test_fresh_scanners_share_the_index_but_not_what_they_found() -> None:
    first = Scanner([Secret("t", b"s3cr3t-token")])
    first.feed(b"x s3cr3t-tok")
    second = first.fresh()
    assert second._index is first._index
    second.feed(b"en")
    first.feed(b"en")
    assert (first.found, second.found) == ({"t"}, set())


def test_scan_finds_a_utf16_value_across_a_slice_boundary() -> None:
    value = "s3cr3t-token-value"
    data = bytearray(3 << 20)
    data[(1 << 20) - 7 : (1 << 20) - 7 + 2 * len(value)] = value.encode("utf-16-le")
    assert scan(memoryview(data), [Secret("t", value.encode()), Secret("u", b"other")]) == ["t"]


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
    expected = {s.name for s in secrets if naive_spans(data, [s], scanned=True)}
    scanner = Scanner(secrets)
    for piece in chunks(data, cuts):
        scanner.feed(piece)
    assert scanner.found == expected
    assert scan(data, secrets) == [s.name for s in secrets if s.name in expected]
