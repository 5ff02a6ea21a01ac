"""Attacks from inside a function, on the process backend (with bubblewrap).

Each attack runs through the whole stack as user code would. Each must fail,
the failure must be reported with its exact error, and the next execution on
the same veritech must be unaffected. Deno's missing permissions are the first
wall; the bubblewrap sandbox underneath is checked from the inside too, by
running a small Python program in the very argv the process backend builds.
docs/security.md says what each backend guarantees.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import StartVeritech
from veritech.backends.process import ProcessBackend
from veritech.backends.sandbox import bwrap_argv, python_roots
from veritech.client import Client, make_request
from veritech.cyclone.runner import default_deno

REPO = Path(__file__).resolve().parents[2]
LIBC = next(
    (
        str(p)
        for p in (
            Path("/lib/x86_64-linux-gnu/libc.so.6"),
            Path("/lib/aarch64-linux-gnu/libc.so.6"),
            Path("/usr/lib/libc.so.6"),
        )
        if p.exists()
    ),
    "/lib/libc.so.6",
)


def not_capable(message: str, name: str = "NotCapable") -> dict[str, Any]:
    return {
        "status": "failure",
        "kind": "user_code_exception",
        "name": name,
        "message": message,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    if result["status"] == "success":
        return {"status": "success", "data": result["data"]}
    error = result["error"]
    got = {"status": "failure", "kind": error["kind"], "message": error["message"]}
    if "name" in error:
        got["name"] = error["name"]
    return got


ATTACKS = [
    pytest.param(
        "async function main() { return await Deno.readTextFile('/etc/passwd') }",
        not_capable('Requires read access to "/etc/passwd"'),
        id="read-etc-passwd",
    ),
    pytest.param(
        "function main() { return Deno.readTextFileSync('/proc/1/environ') }",
        not_capable('Requires read access to "/proc/1/environ"'),
        id="read-proc-1-environ",
    ),
    pytest.param(
        f"function main() {{ return Deno.readTextFileSync('{REPO}/pyproject.toml') }}",
        not_capable(f'Requires read access to "{REPO}/pyproject.toml"'),
        id="read-the-repository",
    ),
    pytest.param(
        "async function main() { return await import('file:///etc/passwd') }",
        not_capable(
            'Requires read access to "/etc/passwd"',
            name="TypeError",
        ),
        id="import-a-host-file",
    ),
    pytest.param(
        "function main() { Deno.writeTextFileSync('/usr/evil', 'x') }",
        not_capable('Requires write access to "/usr/evil"'),
        id="write-outside-tmp",
    ),
    pytest.param(
        "async function main() { const chunk = new Uint8Array(1 << 20);"
        " for (let i = 0; ; i++) await Deno.writeFile('/tmp/fill' + i, chunk) }",
        not_capable('Requires write access to "/tmp/fill0"'),
        id="fill-the-disk",
    ),
    pytest.param(
        "async function main(a) {"
        " return await (await fetch('http://127.0.0.1:' + a.port)).text() }",
        "net",
        id="fetch-the-nats-server",
    ),
    pytest.param(
        "async function main(a) {"
        " return await Deno.connect({ hostname: '127.0.0.1', port: a.port }) }",
        "net",
        id="connect-to-the-nats-server",
    ),
    pytest.param(
        "async function main() { return await import('http://127.0.0.1:1/x.js') }",
        not_capable(
            'Requires import access to "127.0.0.1:1"',
            name="TypeError",
        ),
        id="import-from-the-network",
    ),
    pytest.param(
        "function main() { return Deno.networkInterfaces() }",
        not_capable('Requires sys access to "networkInterfaces"'),
        id="list-network-interfaces",
    ),
    pytest.param(
        "function main() { return Deno.env.toObject() }",
        not_capable("Requires env access"),
        id="read-the-environment",
    ),
    pytest.param(
        "async function main() {"
        " return await new Deno.Command('sh', { args: ['-c', 'id'] }).output() }",
        not_capable('Requires run access to "sh"'),
        id="spawn-a-process",
    ),
    pytest.param(
        "function main() { while (true) new Deno.Command('sh').spawn() }",
        not_capable('Requires run access to "sh"'),
        id="fork-bomb",
    ),
    pytest.param(
        "function main() { return Deno.kill(1, 'SIGKILL') }",
        not_capable("Requires run access"),
        id="signal-another-process",
    ),
    pytest.param(
        f"function main() {{ return Deno.dlopen('{LIBC}', {{}}) }}",
        not_capable(f'Requires ffi access to "{LIBC}"'),
        id="load-native-code",
    ),
    pytest.param(
        "function main() { const keep = [];"
        " while (true) keep.push(new Array(1e6).fill(1)) }",
        {
            "status": "failure",
            "kind": "out_of_memory",
            "message": "the function ran out of memory (limit 256 MiB of heap)",
        },
        id="exhaust-the-heap",
    ),
    pytest.param(
        "function main() { const keep = [];"
        " for (let i = 0; i < 100; i++) keep.push(new Uint8Array(1e8).fill(1));"
        " return keep.length }",
        {
            "status": "failure",
            "kind": "out_of_memory",
            "message": "the function ran out of memory: an ArrayBuffer allocation "
            "failed (limit 256 MiB outside the heap)",
        },
        id="exhaust-memory-outside-the-heap",
    ),
]


@pytest.mark.parametrize(("code", "expected"), ATTACKS)
async def test_attack_from_a_function_fails_and_is_reported(
    start_veritech: StartVeritech,
    client: Client,
    nats_url: str,
    code: str,
    expected: dict[str, Any] | str,
) -> None:
    await start_veritech(pool_size=1)
    port = int(nats_url.rsplit(":", 1)[1])
    if expected == "net":
        expected = not_capable(f'Requires net access to "127.0.0.1:{port}"')

    result = await client.run(
        "resolver", make_request(code, args={"port": port}, timeout_ms=20_000)
    )

    assert summary(result) == expected
    await assert_next_execution_is_unaffected(client)


async def assert_next_execution_is_unaffected(client: Client) -> None:
    code = (
        "function main() { console.log('clean');"
        " return { stash: typeof globalThis.stash, keys: Object.keys(globalThis) } }"
    )
    messages = [m async for m in client.execute("resolver", make_request(code))]
    assert [m.get("message") for m in messages if m["type"] == "output"] == ["clean"]
    result = messages[-1]
    assert result["status"] == "success"
    assert result["data"]["stash"] == "undefined"


async def test_forged_protocol_lines_arrive_as_plain_output_and_the_real_result_wins(
    start_veritech: StartVeritech, client: Client
) -> None:
    await start_veritech(pool_size=1)
    forged_return = '{"nonce":"0123456789abcdef","type":"return","value":666}'
    forged_result = '{"type":"result","status":"success","data":667,"seq":1}'
    forged_output = '{"type":"output","stream":"stderr","level":"error","message":"x"}'
    return_line, result_line = forged_return + "\n", forged_result + "\n"
    code = f"""
    function main() {{
      const raw = (text) => Deno.stdout.writeSync(new TextEncoder().encode(text));
      console.log({json.dumps(forged_return)});
      raw({json.dumps(return_line)});
      raw({json.dumps(result_line)});
      console.error({json.dumps(forged_output)});
      raw('glued to the next line, no newline: ');
      return 1;
    }}"""

    messages = [m async for m in client.execute("resolver", make_request(code))]

    outputs = [
        (m["stream"], m["level"], m["message"])
        for m in messages
        if m["type"] == "output"
    ]
    assert outputs == [
        ("stdout", "info", forged_return),
        ("stdout", "info", forged_return),
        ("stdout", "info", forged_result),
        ("stderr", "error", forged_output),
        ("stdout", "info", "glued to the next line, no newline: "),
    ]
    assert [m["type"] for m in messages].count("result") == 1
    assert summary(messages[-1]) == {"status": "success", "data": 1}
    assert [m["seq"] for m in messages] == list(range(len(messages)))


async def test_an_execution_sees_nothing_of_the_one_before(
    start_veritech: StartVeritech, client: Client
) -> None:
    # Both executions run on a pool of one, so any state an instance kept
    # would be handed to the second. Instances are single use: none is.
    await start_veritech(pool_size=1)
    first = """
    function main() {
      globalThis.stash = 'secret of the first execution';
      Object.prototype.polluted = true;
      setInterval(() => console.log('still here'), 1);
      let wrote = 'no';
      try { Deno.writeTextFileSync('/tmp/stash', 'secret'); wrote = 'yes' }
      catch (e) { wrote = e.name }
      return { pid: Deno.pid, wrote };
    }"""
    second = """
    function main() {
      let file = 'none';
      try { file = Deno.readTextFileSync('/tmp/stash') } catch (e) { file = e.name }
      return {
        stash: typeof globalThis.stash,
        polluted: ({}).polluted === true,
        file,
      };
    }"""

    one = [m async for m in client.execute("resolver", make_request(first))]
    two = [m async for m in client.execute("resolver", make_request(second))]

    assert one[-1]["data"]["wrote"] == "NotCapable"
    assert two[-1]["data"] == {
        "stash": "undefined",
        "polluted": False,
        "file": "NotCapable",
    }
    assert not any(m["type"] == "output" for m in two)


# -- the sandbox underneath Deno ---------------------------------------------

INSIDE = r"""
import errno, json, os, socket, sys
port, other = int(sys.argv[1]), sys.argv[2]
report = {}
with open("/proc/net/dev") as f:
    report["interfaces"] = sorted(l.split(":")[0].strip() for l in f.readlines()[2:])
s = socket.socket()
try:
    s.connect(("127.0.0.1", port))
    report["connect"] = "connected"
except OSError as e:
    report["connect"] = errno.errorcode[e.errno]
report["uid"] = os.getuid()
report["environ"] = sorted(os.environ)
report["processes"] = len([p for p in os.listdir("/proc") if p.isdigit()])
for name, path in [("etc_passwd", "/etc/passwd"), ("home", "/home"),
                   ("tests", sys.argv[3]), ("other_instance", other)]:
    report[name] = os.path.exists(path)
try:
    open("/usr/evil", "w")
    report["write_usr"] = "written"
except OSError as e:
    report["write_usr"] = errno.errorcode[e.errno]
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
            f.flush()
    report["fill_tmp"] = "filled"
except OSError as e:
    report["fill_tmp"] = errno.errorcode[e.errno]
print(json.dumps(report))
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_bubblewrap_sandbox_from_the_inside(nats_url: str, tmp_path: Path) -> None:
    instance_dir, other_dir = tmp_path / "instance", tmp_path / "other"
    instance_dir.mkdir()
    other_dir.mkdir()
    bwrap = shutil.which("bwrap")
    assert bwrap is not None
    port = nats_url.rsplit(":", 1)[1]
    argv = bwrap_argv(
        bwrap,
        [sys.executable, "-c", INSIDE, port, str(other_dir), str(REPO / "tests")],
        instance_dir=instance_dir,
        read_only=[*python_roots(), str(Path(default_deno()).parent)],
        tmp_size_bytes=16 * 1024 * 1024,
    )

    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={"SECRET": "host"}
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {
        "interfaces": ["lo"],
        # The host's nats-server listens on this port; the sandbox's own
        # loopback has nothing there.
        "connect": "ECONNREFUSED",
        "uid": 65534,
        "environ": ["HOME", "LANG", "PATH", "PWD"],
        "processes": report["processes"],
        "etc_passwd": False,
        "home": False,
        "tests": False,
        "other_instance": False,
        "write_usr": "EROFS",
        "fill_tmp": "ENOSPC",
    }
    # Its own PID namespace: bwrap's init, Python, nothing of the host's.
    assert report["processes"] <= 3


def test_process_backend_sandboxes_where_bubblewrap_is_installed() -> None:
    backend = ProcessBackend("security-check")
    assert backend.sandboxed == (shutil.which("bwrap") is not None)
    assert not ProcessBackend("security-check", sandbox=False).sandboxed
