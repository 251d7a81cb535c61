"""The env file, by exact example: what each line means, what is refused, and how a new file
is written. A secret read wrongly (a stray quote or backslash kept in it) would lock the
operator out of the data sealed with it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from appliance.envfile import (
    EnvFileError,
    generate_env_file_text,
    parse_env_file,
    write_new_env_file,
)


def parse(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "appliance.env"
    path.write_bytes(text.encode())
    return parse_env_file(path)


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(EnvFileError) as caught:
        parse(tmp_path, text)
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("KEY=value\n", {"KEY": "value"}),
        ("KEY=\n", {"KEY": ""}),
        ('KEY=""\n', {"KEY": ""}),
        ("KEY=''\n", {"KEY": ""}),
        ("KEY=a=b\n", {"KEY": "a=b"}),
        ("  KEY  =  spaced value  \n", {"KEY": "spaced value"}),
        ("export KEY=v\n", {"KEY": "v"}),
        ("export    KEY=v\n", {"KEY": "v"}),
        ("exportKEY=v\n", {"exportKEY": "v"}),
        ("# a comment\n\n   # indented comment\nA=1\n\n", {"A": "1"}),
        ("A=1 # not a comment\n", {"A": "1 # not a comment"}),
        ("A=1\r\nB=2\rC=3\n", {"A": "1", "B": "2", "C": "3"}),
        # Lines end only at \n, \r and \r\n, as systemd reads them (str.splitlines would
        # also split at these).
        ("A=a\u2028b\x1cc\x0bd\x85e\n", {"A": "a\u2028b\x1cc\x0bd\x85e"}),
        ("A=1\nA=2\n", {"A": "2"}),  # the last one wins, as in systemd
        ('K="a\\$b\\`c\\\\d\\"e\\n"\n', {"K": 'a$b`c\\d"e\\n'}),
        ("K='a\\\"b\\\\'\n", {"K": 'a\\"b\\\\'}),  # no escapes in single quotes
        ('K="abc\\\\"\n', {"K": "abc\\"}),  # an escaped backslash, then the closing quote
        ("K='it\"s'\n", {"K": 'it"s'}),
        ("_K9=x\n", {"_K9": "x"}),
        ("K=\x0cform feed\x1c\n", {"K": "form feed"}),  # str.strip blanks, as before
    ],
)
def test_a_line_means_exactly_this(tmp_path: Path, text: str, expected: dict[str, str]) -> None:
    assert parse(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('KEY="abc\n', 1, 'unterminated " quote'),
        ("A=1\nKEY='abc\n", 2, "unterminated ' quote"),
        ('KEY="\n', 1, 'unterminated " quote'),
        ("KEY='\n", 1, "unterminated ' quote"),
        # The closing quote is escaped: the quote is still open.
        ('KEY="abc\\"\n', 1, 'unterminated " quote'),
        ('KEY="\\"\n', 1, 'unterminated " quote'),
        ('KEY="abc\\\\\\"\n', 1, 'unterminated " quote'),
        ("# c\n\nKEY\n", 3, "expected KEY=VALUE"),
        ("=value\n", 1, "expected KEY=VALUE"),
        ("1KEY=value\n", 1, "expected KEY=VALUE"),
        ("MY-KEY=value\n", 1, "expected KEY=VALUE"),
        ("A=1\r\nB=2\rnot a setting\n", 3, "expected KEY=VALUE"),
    ],
)
def test_a_bad_line_is_refused_by_number_without_its_value(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    message = refusal(tmp_path, text)
    assert message == f"env file {tmp_path / 'appliance.env'} line {line}: {problem}"


def test_a_file_that_cannot_be_read_is_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.env"
    with pytest.raises(EnvFileError) as caught:
        parse_env_file(missing)
    assert str(caught.value) == f"env file {missing} does not exist"
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"KEY=\xff\xfe\n")
    with pytest.raises(EnvFileError) as caught:
        parse_env_file(binary)
    assert str(caught.value) == f"env file {binary} is not UTF-8 text"
    with pytest.raises(EnvFileError) as caught:
        parse_env_file(tmp_path)
    assert str(caught.value) == f"env file {tmp_path} cannot be read (Is a directory)"


def test_a_file_this_user_may_not_read_is_named_as_such(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        path = tmp_path / "locked.env"
        path.write_text("A=1\n")
        path.chmod(0)
    else:
        # root reads any regular file; a write-only sysctl is refused even to root.
        path = Path("/proc/sys/vm/compact_memory")
        if not path.exists():
            pytest.skip("no write-only file that root may not read")
    with pytest.raises(EnvFileError) as caught:
        parse_env_file(path)
    assert str(caught.value) == f"env file {path} is not readable by this user"


def test_a_generated_env_file_has_fresh_strong_secrets_and_safe_defaults() -> None:
    first, second = generate_env_file_text(), generate_env_file_text(production=False)
    values = [dict(re.findall(r"^([A-Z_]+)=(.*)$", text, re.M)) for text in (first, second)]
    assert values[0]["APPLIANCE_ENV"] == "production"
    assert values[1]["APPLIANCE_ENV"] == "development"
    for found in values:
        # 48 and 24 random bytes, URL-safe base64 without padding.
        assert re.fullmatch(r"[A-Za-z0-9_-]{64}", found["SECRET_KEY"])
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", found["PRIVACY_SALT"])
        assert found["PRIVACY_ENCRYPT_AT_REST"] == "true"
        assert found["PRIVACY_REDACT_AGGRESSIVENESS"] == "strict"
        assert found["BACKEND_CORS_ORIGINS"] == ""
    assert values[0]["SECRET_KEY"] != values[1]["SECRET_KEY"]
    assert values[0]["PRIVACY_SALT"] != values[1]["PRIVACY_SALT"]


def test_a_new_env_file_is_private_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "appliance" / "appliance.env"
    write_new_env_file(path, "A=1\n")
    assert path.read_text() == "A=1\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    beside = path.with_name("other.env")  # its directory exists already
    write_new_env_file(beside, "B=2\n")
    assert parse_env_file(beside) == {"B": "2"}
    with pytest.raises(FileExistsError):
        write_new_env_file(path, "A=2\n")
    assert path.read_text() == "A=1\n"
