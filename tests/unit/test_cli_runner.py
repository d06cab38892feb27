"""``replctl`` in-process with click's ``CliRunner``: what needs no cluster (argument
handling, the shell's words, the status table, a peer that is not replkv).
tests/e2e/test_cli.py runs the same commands against a real cluster."""

from __future__ import annotations

import logging
import socketserver
import threading
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from cluster.cli.ctl import main
from cluster.cli.kv_cmd import format_items
from cluster.cli.shell import check_words, shell_help
from cluster.cli.status_cmd import format_status, status_rows
from cluster.local import free_ports


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(autouse=True)
def _keep_log_level() -> Iterator[None]:
    """``--debug`` turns the root logger to DEBUG; put it back."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def closed_port() -> str:
    (port,) = free_ports(1)
    return f"127.0.0.1:{port}"


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--debug", "read", "k"], ["read", "k", "--debug"],
    ["--debug", "status"], ["status", "--debug"], ["health", "--debug"], ["shell", "--debug"],
])
def test_debug_before_or_after_the_command_shows_the_traceback(args: list[str],
                                                               closed_port: str) -> None:
    out = invoke("--router", closed_port, *args)
    assert out.exit_code == 1
    assert "Traceback" in out.stderr and "cannot connect" in out.stderr


@pytest.mark.parametrize("args", [["read", "k"], ["status"], ["health"]])
def test_without_debug_an_error_is_one_line(args: list[str], closed_port: str) -> None:
    out = invoke("--router", closed_port, *args)
    assert out.exit_code == 1
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [["write", "k", "v"], ["read", "k"], ["delete", "k"],
                                     ["show"], ["status"], ["health"]])
def test_every_data_command_takes_json_before_and_after(command: list[str]) -> None:
    for args in (["--json", *command, "--help"], [*command, "--json", "--help"]):
        out = invoke(*args)
        assert out.exit_code == 0, (args, out.output)
    assert "--json" in invoke(*command, "--help").output


def test_health_without_an_address_asks_the_router(closed_port: str) -> None:
    out = invoke("--router", closed_port, "health")
    assert out.exit_code == 1 and f"cannot connect to {closed_port}" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--router", "nonsense", "status"], "expected HOST:PORT"),
    (["write", "only-a-key"], "Missing argument 'VALUE'"),
    (["--router", "127.0.0.1:99999", "status"], "port out of range"),
    (["read", "k", "--min-index", "-3"], "epoch and index must be >= 0"),
    (["read", "k", "--min-index", "x:1"], "is not a read token"),
    (["health", "nohost"], "expected HOST:PORT"),
    (["frobnicate"], "No such command"),
])
def test_bad_arguments_give_one_clear_line(args: list[str], message: str) -> None:
    out = invoke(*args)
    assert out.exit_code == 2 and message in out.stderr and "Traceback" not in out.stderr


# --- a peer that does not speak replkv -------------------------------------------------------


class _HttpAnswer(socketserver.BaseRequestHandler):
    """What an HTTP server answers to bytes it does not understand."""

    def handle(self) -> None:
        self.request.recv(1024)
        self.request.sendall(b"HTTP/1.0 400 Bad request\r\nServer: tiny\r\n\r\n<html/>\n")


@pytest.fixture
def http_server() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _HttpAnswer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("args", [["status"], ["read", "k"], ["write", "k", "v"],
                                  ["health"], ["status", "--json"]])
def test_an_http_server_is_named_as_not_speaking_replkv(http_server: str,
                                                        args: list[str]) -> None:
    out = invoke("--router", http_server, *args)
    assert out.exit_code == 1
    assert out.stderr.strip() == (
        f"Error: protocol: {http_server} does not speak the replkv protocol "
        "(it answered 'HTTP/1.0 400 Bad request')"), out.stderr
    assert "frame" not in out.stderr


# --- the shell's words -----------------------------------------------------------------------


@pytest.mark.parametrize("words,message", [
    (["write", "onlykey"], "write needs KEY VALUE: VALUE is missing"),
    (["write"], "KEY and VALUE are missing"),
    (["read"], "read needs KEY: KEY is missing"),
    (["write", "k", "hello", "world"],
     "write takes KEY VALUE but got 3 words; quotes group words into one: "
     "write k 'hello world'"),
    (["read", "two", "words"], "quotes group words into one: read 'two words'"),
    (["show", "x"], "show takes no arguments"),
    (["bogus"], "unknown command 'bogus'; type 'help'"),
])
def test_the_shell_says_what_is_wrong_with_a_command(words: list[str], message: str) -> None:
    problem = check_words(words)
    assert problem is not None and message in problem, problem


@pytest.mark.parametrize("words", [["write", "k", "hello world"], ["read", "k"], ["show"],
                                   ["help"], ["help", "write"], ["exit"], ["quit"]])
def test_the_shell_accepts_right_commands(words: list[str]) -> None:
    assert check_words(words) is None


def test_shell_help_lists_every_command_and_says_how_to_quote() -> None:
    text = shell_help()
    for line in ("write KEY VALUE", "read KEY", "delete KEY", "show", "status", "exit"):
        assert f"  {line}" in text
    assert "write greeting 'hello world'" in text


def test_show_aligns_keys_and_values_in_two_columns() -> None:
    assert format_items([("a", "1"), ("longer", "two words"), ("b", b"\xff")]) == [
        "a       1", "longer  two words", "b       \\xff"]
    assert format_items([]) == []


# --- the status table ------------------------------------------------------------------------


ROUTER_STATUS_MASTER_DOWN = {
    "router": "127.0.0.1:7000", "master": None,
    "nodes": [
        {"id": "n1", "address": "127.0.0.1:7001", "role": "master", "up": False, "epoch": 1,
         "last_index": 64, "applied_index": 64, "lag_entries": None, "lag_ms": None,
         "majority_index": 63, "last_contact_ms": None, "error": "connection refused"},
        {"id": "n2", "address": "127.0.0.1:7002", "role": "slave", "up": True, "epoch": 1,
         "last_index": 65, "applied_index": 65, "lag_entries": None, "lag_ms": None,
         "majority_index": None, "last_contact_ms": 1450},
        {"id": "n3", "address": "127.0.0.1:7003", "role": "slave", "up": False, "epoch": 1,
         "last_index": 60, "applied_index": 60, "lag_entries": 4, "lag_ms": 12,
         "majority_index": None, "last_contact_ms": 30, "error": "timed out"},
    ],
}

ROUTER_STATUS_ALL_UP = {
    "router": "127.0.0.1:7000", "master": "n1",
    "nodes": [
        {"id": "n1", "address": "127.0.0.1:7001", "role": "master", "up": True, "epoch": 2,
         "last_index": 70, "applied_index": 70, "lag_entries": 0, "lag_ms": 0,
         "majority_index": 69, "last_contact_ms": None},
        {"id": "n2", "address": "127.0.0.1:7002", "role": "slave", "up": True, "epoch": 2,
         "last_index": 68, "applied_index": 68, "lag_entries": 2, "lag_ms": 7,
         "majority_index": None, "last_contact_ms": 45},
    ],
}


def test_status_shows_a_dash_for_what_a_down_node_cannot_tell() -> None:
    rows = status_rows(ROUTER_STATUS_MASTER_DOWN)
    n1, n2, n3 = rows
    assert (n1["last_index"], n1["applied_index"], n1["epoch"]) == (None, None, None)
    assert n1["majority_index"] is None and n3["last_contact_ms"] is None
    assert n1["error"] == "connection refused" and n2["applied_index"] == 65
    lines = format_status(rows).splitlines()
    assert lines[0].split() == ["ID", "ADDRESS", "ROLE", "STATE", "EPOCH", "LAST", "ID",
                                "APPLIED", "MAJORITY", "LAG", "LAG", "MS", "HEARD", "MS"]
    assert lines[1].split() == ["n1", "127.0.0.1:7001", "master", "DOWN", *"-" * 7]
    assert lines[2].split() == ["n2", "127.0.0.1:7002", "slave", "up", "1", "65", "65", "-",
                                "-", "-", "1450"]
    assert lines[3].split() == ["n3", "127.0.0.1:7003", "slave", "DOWN", *"-" * 7]


def test_status_shows_epoch_majority_index_and_how_long_ago_slaves_heard() -> None:
    rows = status_rows(ROUTER_STATUS_ALL_UP)
    assert rows == ROUTER_STATUS_ALL_UP["nodes"]  # --json prints these rows as they are
    lines = format_status(rows).splitlines()
    assert lines[1].split() == ["n1", "127.0.0.1:7001", "master", "up", "2", "70", "70",
                                "69", "0", "0", "-"]
    assert lines[2].split() == ["n2", "127.0.0.1:7002", "slave", "up", "2", "68", "68", "-",
                                "2", "7", "45"]


def test_status_of_a_node_asked_directly_is_one_row() -> None:
    rows = status_rows({"node": "n2", "address": "127.0.0.1:7002", "role": "slave",
                        "epoch": 1, "last_index": 5, "applied_index": 5,
                        "master_link": {"up": True, "last_contact_ms": 80}})
    assert format_status(rows).splitlines()[1].split() == [
        "n2", "127.0.0.1:7002", "slave", "up", "1", "5", "5", "-", "-", "-", "80"]
    rows = status_rows({"node": "n1", "address": "127.0.0.1:7001", "role": "master",
                        "epoch": 3, "last_index": 9, "applied_index": 9, "majority_index": 8})
    assert format_status(rows).splitlines()[1].split() == [
        "n1", "127.0.0.1:7001", "master", "up", "3", "9", "9", "8", "-", "-", "-"]
