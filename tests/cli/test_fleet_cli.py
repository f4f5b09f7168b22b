"""`edge-agent fleet` and `edge-agent fleet cmd` as subprocesses against real agents and mosquitto.

Three agents run as real processes (`edge-agent run`, health every second); dev-killed is killed
with SIGKILL, so only its last will says it is offline. Devices known to be offline are not
expected to answer `all` or a group: `fleet cmd all ping` exits 0 when dev-1 and dev-2 answer.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli.fleet import describe_answer, parse_arguments, parse_broker
from edge_agent.cli.main import main
from edge_agent.config import AgentConfig
from edge_agent.fleet.commands import CommandProcessor
from edge_agent.fleet.monitor import iso_time
from edge_agent.mqtt.messages import CommandResult, DeviceInfo, HealthReport
from tests.broker import Broker, Client, free_port
from tests.support import agent_config, start_agent_process

LIVE = ("dev-1", "dev-2")
KILLED = "dev-killed"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Fleet:
    broker: Broker

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`edge-agent fleet ARGS --broker ...` (connection options after `cmd` work too)."""
        return fleet_cli(*args, "--broker", f"127.0.0.1:{self.broker.port}", timeout=timeout)


def fleet_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "fleet", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_agent(
    model_dir: Path, port: int, device: str, workdir: Path, **env: str
) -> subprocess.Popen[bytes]:
    outbox = workdir / f"{device}-outbox.db"
    return start_agent_process(
        model_dir, port, device, outbox, env={"EDGE_AGENT_HEALTH__INTERVAL": "1", **env}
    )


def online(messages: list[Any]) -> bool:
    return bool(messages) and messages[-1].payload == b"online"


@pytest.fixture(scope="module")
def fleet(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    broker = Broker(workdir).start()
    watcher = Client(broker.port).connect().subscribe("edge_agent/+/availability")
    watcher.subscribe("edge_agent/+/health")
    agents: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for device in (*LIVE, KILLED):
            groups = {"EDGE_AGENT_DEVICE__GROUPS": "[upstairs]"} if device == "dev-1" else {}
            agents[device] = start_agent(model_dir, broker.port, device, workdir, **groups)
        for device in agents:
            watcher.wait_for(f"edge_agent/{device}/availability", online, timeout=90)
            watcher.wait_for(f"edge_agent/{device}/health")  # the killed one leaves health behind
        agents[KILLED].send_signal(signal.SIGKILL)
        agents[KILLED].wait(10)
        watcher.wait_for(f"edge_agent/{KILLED}/availability", lambda m: m[-1].payload == b"offline")
        yield Fleet(broker)
    finally:
        for process in agents.values():
            if process.poll() is None:
                process.terminate()
        for process in agents.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        watcher.close()
        broker.stop()


def snapshot(fleet: Fleet, *args: str) -> dict[str, Any]:
    result = fleet.run("--json", *args)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    return json.loads(line)


def test_json_shows_three_devices_with_the_killed_one_offline(fleet: Fleet) -> None:
    document = snapshot(fleet)
    devices = {row["device"]: row for row in document["devices"]}
    assert sorted(devices) == ["dev-1", "dev-2", "dev-killed"]
    assert document["summary"] == {"devices": 3, "online": 2, "offline": 1, "unknown": 0, "overdue": 0}
    assert document["prefix"] == "edge_agent" and document["connected"] is True
    assert devices[KILLED]["status"] == "offline"  # only the last will can have said so
    for name in (*LIVE, KILLED):
        row = devices[name]
        assert row["version"] == "0.1.0" and row["model"] == "damo/speech_charctc_kws_phone-xiaoyun"
        assert row["backend"] == "numpy" and row["keywords"] and row["keywords"][0]
        assert row["memory_rss_mb"] > 10 and isinstance(row["cpu_percent"], float)
        assert row["outbox_depth"] == 0 and row["mqtt_reconnects"] == 0 and row["detections"] == 0
        assert row["health_interval_s"] == 1.0 and row["worker_alive"] is True
        assert row["overdue"] is False and row["problems"] == []
    for name in LIVE:
        assert devices[name]["status"] == "online"
        assert devices[name]["health_age_s"] < 2.5 and devices[name]["last_seen_age_s"] < 2.5
    assert devices["dev-2"]["keywords"] == ["小云小云"] and devices["dev-1"]["groups"] == ["upstairs"]
    assert devices[KILLED]["health_age_s"] > devices["dev-1"]["health_age_s"]  # it stopped reporting


def test_table_lists_every_device(fleet: Fleet) -> None:
    result = fleet.run("--wait", "1")
    assert result.returncode == 0, result.stderr
    header, columns, *rows = result.stdout.splitlines()
    assert "3 device(s): 2 online, 1 offline, 0 overdue" in header
    assert columns.split()[:3] == ["DEVICE", "STATUS", "LAST"]
    assert [row.split()[:2] for row in rows] == [
        ["dev-1", "online"],
        ["dev-2", "online"],
        [KILLED, "offline"],
    ]
    assert all("speech_charctc_kws_phone-xiaoyun" in row and "0.1.0" in row for row in rows)


def test_overdue_health_is_flagged(fleet: Fleet) -> None:
    """Synthetic retained state under another prefix: a device whose last health is 10 min old
    with a 60 s interval, and an online one that never sent health and started an hour ago."""
    now = time.time()
    publisher = Client(fleet.broker.port).connect()
    try:
        for device, started, health_age in (("stale", now - 3600, 600.0), ("fresh", now - 60, 1.0)):
            publisher.publish(f"overdue_test/{device}/availability", b"online", qos=1, retain=True)
            publisher.publish(f"overdue_test/{device}/info", fake_info(device, started), qos=1, retain=True)
            publisher.publish(
                f"overdue_test/{device}/health", fake_health(device, now - health_age), qos=1, retain=True
            )
        publisher.publish("overdue_test/silent/availability", b"online", qos=1, retain=True)
        publisher.publish("overdue_test/silent/info", fake_info("silent", now - 3600), qos=1, retain=True)
    finally:
        publisher.close()
    document = snapshot(fleet, "--prefix", "overdue_test", "--wait", "0.5")
    devices = {row["device"]: row for row in document["devices"]}
    assert sorted(devices) == ["fresh", "silent", "stale"]
    assert devices["stale"]["overdue"] is True and devices["stale"]["flags"] == ["OVERDUE"]
    assert devices["stale"]["overdue_reason"] == "last health 10m ago, expected every 60 s"
    assert devices["silent"]["overdue"] is True and devices["silent"]["overdue_reason"] == "no health report"
    assert devices["fresh"]["overdue"] is False and devices["fresh"]["flags"] == []
    table = fleet.run("--prefix", "overdue_test", "--wait", "0.5").stdout
    assert "stale: OVERDUE: last health 10m ago" in table and "silent: OVERDUE: no health report" in table


def fake_info(device: str, started: float) -> bytes:
    return DeviceInfo(
        device=device,
        name=None,
        version="0.0.9",
        boot_id="b",
        started=iso_time(started) or "",
        model={"id": "damo/speech_charctc_kws_phone-xiaoyun"},
        keywords=[{"text": "小云小云"}],
        sources=[],
        platform={},
        topics={},
    ).to_payload()


def fake_health(device: str, at: float) -> bytes:
    return HealthReport(
        device=device,
        boot_id="b",
        time=iso_time(at) or "",
        uptime_s=1.0,
        cpu_percent=1.0,
        memory_rss_mb=50.0,
        temperature_c=None,
        detections=0,
        mqtt_reconnects=0,
        streams={},
        interval_s=60.0,
    ).to_payload()


def test_cmd_all_ping_is_answered_by_the_live_devices(fleet: Fleet) -> None:
    result = fleet.run("cmd", "all", "ping", "--json", "--timeout", "20")
    assert result.returncode == 0, result.stderr  # dev-killed is known offline: not expected
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(a["device"] for a in answers) == ["dev-1", "dev-2"]
    assert all(a["ok"] is True and a["command"] == "ping" and a["result"]["pong"] is True for a in answers)
    assert "2 of 2 online device(s) expected; all answers ok" in result.stderr
    assert f"not expected to answer: {KILLED} (offline)" in result.stderr


def test_cmd_to_a_group_reaches_only_its_members(fleet: Fleet) -> None:
    result = fleet.run("cmd", "group:upstairs", "ping", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("dev-1 ") and " ok " in line and '"pong": true' in line
    nobody = fleet.run("cmd", "group:nobody", "ping", "--wait", "0.5", "--timeout", "2")
    assert nobody.returncode == 0 and nobody.stdout == ""
    assert "warning: no online device in group:nobody" in nobody.stderr


def test_set_config_keywords_is_applied_and_visible_in_the_monitor(fleet: Fleet) -> None:
    result = fleet.run("cmd", "dev-1", "set_config", 'keywords=["如家酒店"]', "--timeout", "20")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("dev-1 ") and '"applied": true' in line and '"keywords": ["如家酒店"]' in line
    try:
        devices = {row["device"]: row for row in snapshot(fleet, "--wait", "1")["devices"]}
        assert devices["dev-1"]["keywords"] == ["如家酒店"]
        assert devices["dev-2"]["keywords"] == ["小云小云"]
    finally:
        # A plain string is not JSON: it is sent as a string, which the agent accepts as one keyword.
        restore = fleet.run("cmd", "dev-1", "set_config", "keywords=小云小云", "--json")
        assert restore.returncode == 0, restore.stderr
        assert json.loads(restore.stdout)["result"]["keywords"] == ["小云小云"]


def test_an_unknown_command_is_refused_with_exit_1(fleet: Fleet) -> None:
    result = fleet.run("cmd", "dev-2", "self_destruct", "--timeout", "20")
    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith("dev-2 ") and "error  unknown command 'self_destruct'" in line
    assert "failed: dev-2" in result.stderr


def test_a_device_that_does_not_answer_gives_exit_1(fleet: Fleet) -> None:
    result = fleet.run("cmd", KILLED, "ping", "--timeout", "1.5", "--wait", "0.5")
    assert result.returncode == 1 and result.stdout == ""
    assert f"warning: {KILLED} is offline; waiting for an answer anyway" in result.stderr
    assert f"no answer within 1.5 s from: {KILLED}" in result.stderr


def test_connection_options_may_come_before_cmd(fleet: Fleet) -> None:
    result = fleet_cli(
        "--broker",
        f"127.0.0.1:{fleet.broker.port}",
        "--json",
        "cmd",
        "dev-2",
        "get_config",
        "--timeout",
        "20",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["result"]["config"]["device"]["id"] == "dev-2" and answer["result"]["muted"] is False


def test_watch_refreshes_until_ctrl_c(fleet: Fleet) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "fleet",
            "--watch",
            "--json",
            "--wait",
            "0.5",
            "--broker",
            f"127.0.0.1:{fleet.broker.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []], daemon=True)
    reader.start()
    try:
        first, second = (json.loads(lines.get(timeout=30)) for _ in range(2))
        assert first["summary"]["devices"] == second["summary"]["devices"] == 3
        assert second["time"] > first["time"]
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        reader.join(5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def commanded_agent(make_agent, config: AgentConfig) -> None:  # type: ignore[no-untyped-def]
    """An in-process agent that answers commands, as `edge-agent run` builds it."""
    make_agent(config, integrations=lambda agent: [CommandProcessor(agent)])


def test_an_mqtt_311_agent_answers_on_cmd_result(broker, make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An MQTT 3.1.1 agent never sees the response topic: it answers on {device}/cmd_result with
    the id echoed; the monitor matches it, whether it speaks MQTT 5 or 3.1.1 itself."""
    commanded_agent(make_agent, agent_config(broker.port, tmp_path, device="old", mqtt={"protocol": "3.1.1"}))
    address = f"127.0.0.1:{broker.port}"
    for protocol in ("5", "3.1.1"):
        for target in ("old", "all"):
            result = fleet_cli(
                "cmd", target, "ping", "--broker", address, "--protocol", protocol, "--wait", "0.5"
            )
            assert result.returncode == 0, (protocol, target, result.stderr)
            assert result.stdout.startswith("old ") and '"pong": true' in result.stdout


def test_under_the_documented_acl(make_agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """deploy/mosquitto/edge-agent.acl lets a device publish only under its own subtree: answers
    to `all` must come on {device}/cmd_result, and a refused login is a connection error (2)."""
    users = {"kitchen": "secret-kitchen", "fleet": "secret-fleet"}
    passwords = tmp_path / "passwd"
    for index, (user, password) in enumerate(users.items()):
        command = ["mosquitto_passwd", "-b", *(["-c"] if index == 0 else []), str(passwords), user, password]
        subprocess.run(command, check=True)
    for user, password in users.items():
        (tmp_path / f"{user}.secret").write_text(password + "\n", encoding="utf-8")
    port = free_port()
    broker = Broker(
        tmp_path,
        port=port,
        extra_config=f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        f"acl_file {REPO / 'deploy' / 'mosquitto' / 'edge-agent.acl'}\n",
    ).start()
    try:
        login = {"username": "kitchen", "password_file": str(tmp_path / "kitchen.secret")}
        commanded_agent(make_agent, agent_config(port, tmp_path, device="kitchen", mqtt=login))
        options = ["--broker", f"127.0.0.1:{port}", "--username", "fleet", "--wait", "0.5"]
        options += ["--password-file", str(tmp_path / "fleet.secret")]
        for target in ("all", "kitchen"):
            result = fleet_cli("cmd", target, "ping", *options)
            assert result.returncode == 0, (target, result.stderr)
            assert result.stdout.startswith("kitchen ") and '"pong": true' in result.stdout
        document = json.loads(fleet_cli("--json", *options).stdout)
        assert [(d["device"], d["status"]) for d in document["devices"]] == [("kitchen", "online")]
        refused = fleet_cli("--json", *options[:-1], str(tmp_path / "kitchen.secret"))
        assert refused.returncode == 2 and refused.stdout == ""
        assert "refused the connection: Not authorized" in refused.stderr
    finally:
        broker.stop()


# --- errors and parsing: no agents needed --------------------------------------------------------


def test_an_unreachable_broker_exits_2_with_a_clear_message() -> None:
    port = free_port()
    for args in (["--json"], ["cmd", "all", "ping"]):
        result = fleet_cli(*args, "--broker", f"127.0.0.1:{port}")
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert (
            f"edge-agent: error: cannot connect to the broker 127.0.0.1:{port}: connection refused"
            in result.stderr
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cmd", "a/b", "ping"], "'a/b' is not a device id, 'all' or 'group:NAME'"),
        (["cmd", "all", "a+b"], "cannot be a topic level"),
        (["cmd", "all", "set_config", "keywords"], "argument 'keywords': expected KEY=VALUE"),
        (["cmd", "all", "ping", "--args", "[1]"], "--args must be a JSON object, got list"),
        (["cmd", "all", "ping", "id=7"], "'id' is set by edge-agent fleet"),
        (["cmd", "all", "ping", "--timeout", "0"], "--timeout must be positive"),
        (["--broker", "host:port"], "port 'port' is not a number"),
        (["--wait", "-1"], "--wait must not be negative"),
        (["--username", "u", "--password-file", "/nonexistent/secret"], "cannot read /nonexistent/secret"),
        (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem"),
    ],
)
def test_usage_errors_exit_2_before_connecting(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fleet", *argv, "--broker", "127.0.0.1:1"] if "--broker" not in argv else ["fleet", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_key_value_arguments_are_json_when_they_parse() -> None:
    assert parse_arguments(['keywords=["小云小云"]', "muted=false", "name=kitchen", "n=3", "x=null"]) == {
        "keywords": ["小云小云"],
        "muted": False,
        "name": "kitchen",
        "n": 3,
        "x": None,
    }
    assert parse_arguments(["engine.muted=true", "health.interval=5", "text=a=b", "empty="]) == {
        "engine": {"muted": True},
        "health": {"interval": 5},
        "text": "a=b",
        "empty": "",
    }
    assert parse_arguments(["health.interval=5"], '{"engine": {"muted": true}, "health": {"x": 1}}') == {
        "engine": {"muted": True},
        "health": {"x": 1, "interval": 5},
    }
    for bad in (["a.=1"], [".a=1"], ["n=1", "n.m=2"], ["=1"], ["x=NaN"], ["x=[Infinity]"]):
        with pytest.raises(ValueError):
            parse_arguments(bad)


def test_broker_addresses() -> None:
    assert parse_broker("broker", tls=False) == ("broker", 1883)
    assert parse_broker("broker", tls=True) == ("broker", 8883)
    assert parse_broker("broker:1884", tls=True) == ("broker", 1884)
    assert parse_broker("[::1]:1885", tls=False) == ("::1", 1885)
    assert parse_broker("[::1]", tls=False) == ("::1", 1883)
    for bad in (":1883", "broker:0", "broker:70000", "[::1]x"):
        with pytest.raises(ValueError):
            parse_broker(bad, tls=False)


def test_answer_lines_are_readable() -> None:
    ok = CommandResult(
        device="d", command="set_config", ok=True, result={"a": 1}, restart_required=["mqtt.host"]
    )
    assert describe_answer("d", ok) == 'd                ok     {"a": 1}  (restart required: mqtt.host)'
    refused = CommandResult(device="d", command="x", ok=False, error="unknown command 'x'")
    assert describe_answer("d", refused) == "d                error  unknown command 'x'"


def test_cmd_help_has_one_clean_usage_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "fleet", "cmd", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    usage = result.stdout.split("\n\n")[0]
    assert usage.startswith("usage: edge-agent fleet cmd [-h]") and usage.count("usage:") == 1
    assert usage.rstrip().endswith("TARGET NAME [KEY=VALUE ...]") and "[options] cmd" not in usage
