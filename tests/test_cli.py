"""The `deployhealth` command as a user runs it: a real process, real servers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests
from support.coder_schema import check_report
from support.serve import COMMAND, TIMESTAMP, ServeProcess, clean_env, message, readyz

from deployhealth.sim.inventory import seed_database
from deployhealth.sim.tcp import free_port


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [COMMAND, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    if args[:1] == ["check"] and "--json" in args and result.returncode in (0, 1):
        # Every report the command prints must be Coder's HealthcheckReport.
        check_report(json.loads(result.stdout))
    return result




def test_check_json_prints_only_the_report_and_exits_0_when_ready(healthy_env, tmp_path):
    result = run(["check", "--json"], healthy_env, tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout is the report and nothing else
    assert report["healthy"] is True
    assert report["deployment"] == "cli-test"
    assert report["access_url"]["status_code"] == 200
    assert report["database"]["reachable"] is True


def test_check_exits_1_and_names_the_code_when_the_access_url_fails(healthy_env, sim, tmp_path):
    sim.set_faults({"healthz": "502"})
    result = run(["check", "--json"], healthy_env, tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert [w["code"] for w in report["access_url"]["warnings"]] == ["EACS04"]

    table = run(["check"], healthy_env, tmp_path)
    assert table.returncode == 1
    assert "EACS04" in table.stdout and "NOT READY (access_url failing)" in table.stdout


def test_check_section_judges_only_the_named_sections(healthy_env, sim, tmp_path):
    sim.set_faults({"healthz": "502"})
    result = run(["check", "--json", "--section", "Database"], healthy_env, tmp_path)
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert report["database"]["reachable"] is True
    # The failing access URL was not checked, and the report says so instead of failing it.
    assert [w["code"] for w in report["access_url"]["warnings"]] == ["ENOTCHECKED"]
    assert report["healthy"] is True


def all_codes(report: dict) -> set[str]:
    codes: set[str] = set()
    for section in report.values():
        if isinstance(section, dict) and "severity" in section:
            codes |= {w["code"] for w in section["warnings"]}
            codes |= {line.split(":", 1)[0] for line in (section.get("error") or "").splitlines()}
    return codes


UNLICENSED_SECTIONS = ["--section", "WorkspaceProxy", "--section", "ProvisionerDaemons",
                       "--section", "Entitlements"]


def test_check_an_unlicensed_deployment_reading_daemons_from_its_database(
    sim, coder_db, tmp_path
):
    url, execute = coder_db
    sim.set_faults({"licence": "none-old"})
    seed_database(sim, execute)
    env = clean_env(
        DEPLOYHEALTH_ACCESS_URL=sim.url,
        DEPLOYHEALTH_DATABASE_URL=url,
        DEPLOYHEALTH_CODER_TOKEN=sim.token,
        DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS="1000",
    )
    result = run(["check", "--json"], env, tmp_path)
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert not {"EUNKNOWN", "EWP02"} & all_codes(report)
    proxies = report["workspace_proxy"]
    assert proxies["severity"] == "ok" and proxies["workspace_proxies"] == {"regions": []}
    assert "not licensed for" in proxies["note"] and "nothing to check" in proxies["note"]
    daemons = report["provisioner_daemons"]
    assert daemons["severity"] == "ok"
    assert [i["provisioner_daemon"]["name"] for i in daemons["items"]] == ["provisioner-coder"]
    assert daemons["note"].startswith("read from the database inventory")
    assert report["entitlements"]["has_license"] is False
    # Named, the sections that do not gate by default gate too.
    named = run(["check", "--json", *UNLICENSED_SECTIONS], env, tmp_path)
    assert named.returncode == 0, named.stdout


def test_check_an_unlicensed_deployment_without_a_database(sim, tmp_path):
    sim.set_faults({"licence": "none-old"})
    env = clean_env(DEPLOYHEALTH_ACCESS_URL=sim.url, DEPLOYHEALTH_CODER_TOKEN=sim.token)
    result = run(["check", "--json", *UNLICENSED_SECTIONS], env, tmp_path)
    assert result.returncode == 0, result.stdout
    report = json.loads(result.stdout)
    assert all_codes(report) == {"ENOTCHECKED"}
    daemons = report["provisioner_daemons"]
    assert daemons["severity"] == "warning" and daemons["items"] == []
    assert "DEPLOYHEALTH_DATABASE_URL" in daemons["warnings"][0]["message"]
    assert report["workspace_proxy"]["severity"] == "ok"


def test_check_with_a_rejected_token_says_epd04_not_epd01(sim, tmp_path):
    env = clean_env(DEPLOYHEALTH_ACCESS_URL=sim.url, DEPLOYHEALTH_CODER_TOKEN="revoked-token-7")
    result = run(["check", "--json", "--section", "ProvisionerDaemons"], env, tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    # The sections not named are ENOTCHECKED (Coder's report has all six); the one checked:
    assert all_codes({"provisioner_daemons": report["provisioner_daemons"]}) == {"EPD04"}
    assert all_codes(report) == {"EPD04", "ENOTCHECKED"}
    assert "revoked-token-7" not in result.stdout + result.stderr


def test_check_with_the_database_down_is_not_ready(sim, tmp_path):
    env = clean_env(
        DEPLOYHEALTH_ACCESS_URL=sim.url,
        DEPLOYHEALTH_DATABASE_URL=f"postgresql://coder:pw@127.0.0.1:{free_port()}/coder",
    )
    result = run(["check", "--json"], env, tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout)["database"]["error"].startswith("EDB01")


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS": "fast"}, "DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS"),
        ({"DEPLOYHEALTH_STORE": "redis://x"}, "DEPLOYHEALTH_STORE"),
        ({"DEPLOYHEALTH_ACESS_URL": "http://x"}, "DEPLOYHEALTH_ACCESS_URL"),
    ],
)
def test_bad_settings_exit_2_naming_the_key(settings, key, tmp_path):
    result = run(["check"], clean_env(**settings), tmp_path)
    assert result.returncode == 2
    assert key in result.stderr
    assert result.stdout == ""


def test_bad_settings_in_a_toml_file_name_the_file_and_key(tmp_path):
    config = tmp_path / "health.toml"
    config.write_text('stale_after_seconds = "soon"\n')
    result = run(["check", "--config", str(config)], clean_env(), tmp_path)
    assert result.returncode == 2
    assert "stale_after_seconds" in result.stderr and "not a number" in result.stderr


def test_a_secret_never_reaches_the_output(sim, tmp_path):
    password = "pl4nted-S3cret-value"
    env = clean_env(
        DEPLOYHEALTH_ACCESS_URL=sim.url,
        DEPLOYHEALTH_DATABASE_URL=f"postgresql://coder:{password}@127.0.0.1:{free_port()}/db",
    )
    for args in (["check"], ["check", "--json"]):
        result = run(args, env, tmp_path)
        assert password not in result.stdout + result.stderr


def test_codes_lists_and_explains(tmp_path):
    listing = run(["codes"], clean_env(), tmp_path)
    assert listing.returncode == 0
    assert "EACS04" in listing.stdout and "EDB01" in listing.stdout
    one = run(["codes", "edb02"], clean_env(), tmp_path)
    assert one.returncode == 0
    assert "docs/codes.md#edb02" in one.stdout
    unknown = run(["codes", "EXYZ99"], clean_env(), tmp_path)
    assert unknown.returncode == 2 and "unknown code" in unknown.stderr


def test_codes_states_the_severity_docs_and_readiness_use(tmp_path):
    from deployhealth.codes import CODES

    docs = (Path(__file__).resolve().parent.parent / "docs" / "codes.md").read_text()
    listing = run(["codes"], clean_env(), tmp_path).stdout.splitlines()
    for code in CODES.values():
        row = next(line for line in listing if line.split()[0] == code.code)
        assert row.split()[2] == code.severity.value, row
        explained = run(["codes", code.code], clean_env(), tmp_path).stdout
        assert f"({code.section}, {code.severity_text})" in explained
        assert f"- Severity: {code.severity_text}\n" in docs
    escalating = [c.code for c in CODES.values() if c.error_when]
    assert escalating == ["EACS06", "EWP04"]


def test_codes_into_a_closed_pipe_is_not_a_traceback(tmp_path):
    # A pipe whose reader is already gone, as `| head -1` leaves it: every write fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [COMMAND, "codes"], stdout=write_end, stderr=subprocess.PIPE,
            env=clean_env(), cwd=tmp_path, timeout=30, check=False,
        )
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, b"")


@pytest.mark.parametrize(
    ("fault", "broken", "repaired", "failed_line"),
    [
        ("healthz", "502", "ok", "[-]access_url failed: EACS04"),
        ("replicas", "two-no-ha", "one", "[-]entitlements failed: EENT01"),
    ],
)
def test_serve_turns_readyz_503_within_one_round_of_a_fault_and_back(
    healthy_env, sim, tmp_path, fault, broken, repaired, failed_line
):
    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{tmp_path / 'r.db'}"}
    server = ServeProcess.on_free_port(env, tmp_path)
    base = server.base
    try:
        server.wait_for("round:")
        assert readyz(base).status_code == 200

        sim.set_faults({fault: broken})
        server.next_round_started_after_now()
        down = readyz(base)
        assert down.status_code == 503
        assert failed_line in down.text
        assert down.headers["Cache-Control"] == "no-store"

        sim.set_faults({fault: repaired})
        server.next_round_started_after_now()
        up = readyz(base)
        assert up.status_code == 200
        for section in ("access_url", "database", "websocket", "derp", "entitlements"):
            assert f"[+]{section} ok" in up.text
    finally:
        assert server.stop() == 0


def test_serve_follows_the_database_going_down_and_coming_back(sim, tmp_path):
    from deployhealth.sim.postgres import LocalPostgres

    with LocalPostgres() as postgres:
        env = clean_env(
            DEPLOYHEALTH_ACCESS_URL=sim.url,
            DEPLOYHEALTH_DATABASE_URL=postgres.url,
            DEPLOYHEALTH_CODER_TOKEN=sim.token,
            DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS="1000",
            DEPLOYHEALTH_STORE=f"sqlite:///{tmp_path / 'r.db'}",
        )
        server = ServeProcess.on_free_port(env, tmp_path)
        base = server.base
        try:
            server.wait_for("round:")
            assert readyz(base).status_code == 200
            postgres.stop()
            server.next_round_started_after_now()
            down = readyz(base)
            assert down.status_code == 503 and "[-]database failed: EDB01" in down.text
            postgres.start()
            server.next_round_started_after_now()
            assert readyz(base).status_code == 200
        finally:
            assert server.stop() == 0


def test_demo_serves_both_sections_and_takes_faults(tmp_path):
    demo = ServeProcess.on_free_port(clean_env(), tmp_path, command="demo")
    base = demo.base
    try:
        sim_line = demo.wait_for("simulated deployment")
        sim_url = sim_line.split()[-1]
        demo.wait_for("round:")
        ready = readyz(base)
        assert ready.status_code == 200, ready.text
        assert "[+]access_url ok" in ready.text and "[+]database ok" in ready.text

        fault = requests.post(f"{sim_url}/_sim/faults", params={"database": "down"}, timeout=10)
        assert fault.status_code == 200
        demo.next_round_started_after_now()
        assert "[-]database failed: EDB01" in readyz(base).text
    finally:
        assert demo.stop() == 0


def test_demo_switch_lands_between_rounds_and_the_next_round_shows_it(tmp_path):
    # The demo's promise (sim/demo.py): a switch waits for the round in flight, says
    # "fault: ...", and the round: line after that is the first to see it. No round line
    # before the fault line can be taken for the round after.
    # Without --verbose, as a user runs it: only a round that changed the verdict writes.
    demo = ServeProcess.on_free_port(clean_env(), tmp_path, command="demo", every_round=False)
    try:
        sim_url = demo.wait_for("simulated deployment").split()[-1]
        demo.wait_for("round:")
        for mode, verdict in (("unreachable", "workspace_proxy=warning(EWP04)"),
                              ("ok", "workspace_proxy=ok")):
            fault = requests.post(f"{sim_url}/_sim/faults", params={"proxy": mode}, timeout=60)
            assert fault.status_code == 200 and fault.json()["proxy"] == mode
            demo.wait_for(f"fault: proxy={mode}")
            assert verdict in demo.wait_for("round:")
        health = requests.get(f"{demo.base}/api/v2/debug/health", timeout=10)
        assert health.json()["workspace_proxy"]["severity"] == "ok"
    finally:
        assert demo.stop() == 0


# --- credentials inside URL settings -------------------------------------------------


def test_credentials_in_url_settings_reach_no_output_store_or_api(sim, local_postgres, tmp_path):
    # Every planted credential holds "Pl4nted"; the user names are distinctive too.
    host = sim.url.removeprefix("http://")
    access = f"http://leak-user:Pl4nted-AccessPw@{host}/?coder_session_token=Pl4nted-QueryTok"
    derp = f"http://derp-user:Pl4nted-DerpPw@{host}/no-such-derpmap.json?token=Pl4nted-DerpTok"
    database = local_postgres.url.replace(
        f"{local_postgres.user}:", f"{local_postgres.user}:Pl4nted-", 1
    )  # a wrong password: EDB01 quotes the target
    planted = ("Pl4nted", "leak-user", "derp-user")

    def leaked(text: str) -> list[str]:
        return [p for p in planted if p in text]

    store = tmp_path / "r.db"
    env = clean_env(
        DEPLOYHEALTH_ACCESS_URL=access,
        DEPLOYHEALTH_DERP_MAP=derp,
        DEPLOYHEALTH_DATABASE_URL=database,
        DEPLOYHEALTH_CODER_TOKEN=sim.token,
        DEPLOYHEALTH_STORE=f"sqlite:///{store}",
    )
    for token in (sim.token, "Pl4nted-revoked-token"):  # the second: inventory errors
        env["DEPLOYHEALTH_CODER_TOKEN"] = token
        for args in (["check"], ["check", "--json"]):
            result = run(args, env, tmp_path)
            assert result.returncode == 1, result.stderr
            assert leaked(result.stdout + result.stderr) == [], result.stdout
    report = json.loads(run(["check", "--json"], env, tmp_path).stdout)
    # The URL is still shown, less its credentials; the failures still say what failed.
    assert report["access_url"]["access_url"] == f"http://{host}/?coder_session_token=***"
    assert report["access_url"]["healthy"] is True
    assert "authentication failed" in report["database"]["error"]
    assert "EPD04" in report["provisioner_daemons"]["error"]

    server = ServeProcess.on_free_port(env, tmp_path)
    base = server.base
    try:
        server.wait_for("round:")
        server.wait_for("round:")  # a second round: history has more than one entry
        bodies = [
            requests.get(f"{base}{path}", timeout=10).text
            for path in (
                "/api/v2/debug/health",
                "/api/v2/debug/health?force=true",
                "/api/v2/debug/health/history",
                "/readyz?verbose",
                "/health",
            )
        ]
    finally:
        assert server.stop() == 0
    assert "EDB01" in bodies[0] and "derp" in bodies[2]
    for body in bodies:
        assert leaked(body) == []
    assert leaked("".join(server.seen)) == []
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("r.db*"))
    assert b"EDB01" in stored
    assert [p for p in planted if p.encode() in stored] == []


# --- the command's own surface: version, help, errors, tables, log lines ---------------


def test_version_is_the_installed_packages(tmp_path):
    from importlib.metadata import version

    result = run(["--version"], clean_env(), tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"deployhealth {version('deployhealth')}"


def test_every_bad_setting_is_reported_in_one_go_without_secrets(tmp_path):
    env = clean_env(
        DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS="fast",
        DEPLOYHEALTH_STORE="redis://x",
        DEPLOYHEALTH_DATABASE_URL="mysql://coder:Pl4nted-pw@db/coder",
        DEPLOYHEALTH_ACESS_URL="http://x",
    )
    result = run(["check"], env, tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "deployhealth: 4 invalid settings:"
    named = {line.split(":")[0].strip() for line in lines[1:]}
    assert named == {"DEPLOYHEALTH_DB_LATENCY_THRESHOLD_MS", "DEPLOYHEALTH_STORE",
                     "DEPLOYHEALTH_DATABASE_URL", "DEPLOYHEALTH_ACESS_URL"}
    assert "did you mean DEPLOYHEALTH_ACCESS_URL?" in result.stderr
    assert "is not a postgresql:// URL" in result.stderr
    assert "Pl4nted" not in result.stderr


@pytest.mark.parametrize("command", ["check", "serve"])
def test_help_names_every_variable_the_config_file_and_the_exit_codes(command, tmp_path):
    from deployhealth.settings import known_keys

    result = run([command, "--help"], clean_env(COLUMNS="100"), tmp_path)
    assert result.returncode == 0
    text = result.stdout
    for key in known_keys():
        if "_DEADLINE_" not in key:
            assert f"DEPLOYHEALTH_{key}" in text, key
    assert "DEPLOYHEALTH_<FAMILY>_DEADLINE_SECONDS" in text
    assert "./deployhealth.toml" in text and "docs/configuration.md" in text
    assert "exit status:" in text
    assert "2    bad settings" in text
    if command == "check":
        assert "0    ready" in text and "1    not ready" in text


def test_demo_and_codes_help_name_their_exit_codes(tmp_path):
    demo = run(["demo", "--help"], clean_env(), tmp_path).stdout
    assert "exit status:" in demo and "the port is taken (try --port)" in demo
    assert "export DEPLOYHEALTH_" in demo and "heartbeat" in demo
    codes = run(["codes", "--help"], clean_env(), tmp_path).stdout
    assert "2    unknown code" in codes


def test_codes_table_columns_line_up_for_the_long_section_names(tmp_path):
    from deployhealth.codes import CODES

    rows = run(["codes"], clean_env(), tmp_path).stdout.splitlines()
    assert len(rows) == len(CODES)
    # Each column starts at the same offset on every row, whatever the section's length.
    for column in (1, 2, 3):
        starts = set()
        for row, code in zip(rows, CODES.values(), strict=True):
            cells = [code.code, code.section, code.severity.value, code.title]
            offset = 0
            for cell in cells[:column]:
                offset = row.index(cell, offset) + len(cell)
            starts.add(row.index(cells[column], offset))
        assert len(starts) == 1, (column, starts)
    assert any("provisioner_daemons" in row for row in rows)


def test_serve_writes_a_round_line_only_when_something_changed_and_a_heartbeat(
    healthy_env, sim, tmp_path
):
    env = {**healthy_env, "DEPLOYHEALTH_STORE": f"sqlite:///{tmp_path / 'r.db'}"}
    args = ["serve", "--port", str(free_port()), "--interval", "1", "--heartbeat", "2"]
    server = ServeProcess(args, env, tmp_path)
    try:
        first = server.wait_for("round:")
        assert "access_url=ok" in first
        # Unchanged rounds: heartbeats only, each counting the rounds since the last line.
        for _ in range(2):
            beat = server.wait_for("heartbeat:")
            assert int(message(beat).split()[1]) >= 1
        since_first = server.seen[server.seen.index(first) + 1 :]
        assert [line for line in since_first if message(line).startswith("round:")] == []
        sim.set_faults({"healthz": "502"})
        changed = server.wait_for("round:")
        assert "access_url=warning(EACS04)" in changed
        assert readyz(server.base).status_code == 503
        sim.set_faults({"healthz": "ok"})
        assert "access_url=ok" in server.wait_for("round:")
    finally:
        assert server.stop() == 0
    log_lines = [line for line in server.seen if message(line).startswith(("round:", "heart"))]
    assert log_lines and all(TIMESTAMP.match(line) for line in log_lines)
