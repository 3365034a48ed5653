"""The machines of a multi-machine `tunefleet launch` meet before any training process starts.

Node 0 listens on the main port; every other node connects (retrying until node 0 is up) and says
who it is and what it will run: its node rank, the node and process counts, the resolved recipe
and what it found in the output directory. Node 0 refuses a node whose run differs (another
recipe or `--set`, another process count, another `--main-address` or port, other bytes in the
data files, another state of the output directory: storage that is not shared), waits at most `timeout_s` for all of them and names the ones that never came. When
all are there it writes its files (`ready`), then tells every node to go. The port is then free
again for torch's rendezvous, which node 0 opens on it.

Without this, torch's static rendezvous waits for a missing node for half an hour without a word.
Messages are JSON lines on one TCP connection per node.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunefleet.launch.core.errors import TunefleetError

RETRY_S = 1.0
"""A node that cannot reach node 0 yet tries again after this long."""
HELLO_TIMEOUT_S = 30.0
"""How long node 0 waits for the first line of a node that connected."""
MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True, kw_only=True)
class Member:
    """What one node tells node 0 (and what node 0 compares with its own)."""

    node_rank: int
    nodes: int
    procs_per_node: int
    use_cpu: bool
    recipe: dict[str, Any]
    """The resolved recipe, as `recipe.to_dict` writes it."""
    start: str
    """What this node found in the output directory: `fresh`, `resume <checkpoint>`, `overwrite`."""
    main_address: str = ""
    """The `--main-address` this node was given: torch's rendezvous meets there, so every node must
    name the same one (two addresses of node 0 pass the join and then hang in torch's store)."""
    main_port: int = 0
    data: str = ""
    """The fingerprint of the data this node sees (`core/data_identity.py`): node-local copies
    that differ at the same path are refused here, not found out by a hang."""

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(mine: Member, theirs: Member) -> list[str]:
    """What keeps two nodes from running one job, one line each (`key: node 0's, node R's`)."""
    lines = []
    for key in ("nodes", "procs_per_node", "use_cpu"):
        if getattr(mine, key) != getattr(theirs, key):
            lines.append(
                f"{key}: {getattr(mine, key)} on node 0, {getattr(theirs, key)} on node {theirs.node_rank}"
            )
    r = theirs.node_rank
    if (mine.main_address, mine.main_port) != (theirs.main_address, theirs.main_port):
        lines.append(
            f"--main-address/--main-port: {mine.main_address}:{mine.main_port} on node 0, "
            f"{theirs.main_address}:{theirs.main_port} on node {r} (give every node the same address of node 0)"
        )
    if mine.data != theirs.data:
        lines.append(
            f"data: fingerprint {mine.data} on node 0, {theirs.data} on node {r}: the data files at the "
            "recipe's paths hold other bytes on that machine (copy the same data to every node, or put "
            "it on storage they share)"
        )
    a, b = _flat(mine.recipe), _flat(theirs.recipe)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key)!r} on node 0, {b.get(key)!r} on node {theirs.node_rank}")
    if mine.start != theirs.start:
        lines.append(
            f"output directory: node 0 finds {mine.start}, node {theirs.node_rank} finds {theirs.start} "
            "(is output_dir on storage both mount at the same path?)"
        )
    return lines


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read_line(conn: socket.socket, deadline: float) -> dict[str, Any] | None:
    """One JSON line, or None when the peer closed or the deadline passed."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > MAX_LINE_BYTES:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(65536)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _missing_fix(me: Member, address: str, port: int, timeout_s: float) -> str:
    return (
        f"start `tunefleet launch ... --nnodes {me.nodes} --node-rank R --main-address {address} "
        f"--main-port {port}` on each missing machine (`tunefleet plan RECIPE --nodes {me.nodes}` prints "
        f"the commands), check that it reaches {address}:{port} (firewall), or wait longer with "
        f"--join-timeout (now {timeout_s:g} s)"
    )


def host(me: Member, *, port: int, address: str, timeout_s: float, ready: Callable[[], None]) -> None:
    """Node 0: wait for every other node, check them against `me`, call `ready`, tell them to go."""
    joined: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout_s
    try:
        server = socket.create_server(("", port))
    except OSError as exc:
        raise TunefleetError(
            f"node 0 cannot listen on port {port}: {exc.strerror or exc}",
            "pick a port that is free on node 0 and pass the same --main-port on every machine",
        ) from None
    with server:
        server.settimeout(0.5)
        try:
            while len(joined) < me.nodes - 1:
                if time.monotonic() > deadline:
                    missing = [r for r in range(1, me.nodes) if r not in joined]
                    raise TunefleetError(
                        f"node(s) {', '.join(map(str, missing))} of {me.nodes} did not join within "
                        f"{timeout_s:g} s (node 0 waits on port {port})",
                        _missing_fix(me, address, port, timeout_s),
                    )
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                _admit(me, conn, joined)
            ready()
            for conn in joined.values():
                _send(conn, {"go": True})
            _wait_for_close(joined.values())
        except BaseException as exc:
            problem = (
                exc.problem if isinstance(exc, TunefleetError) else f"node 0 stopped ({type(exc).__name__})"
            )
            for conn in joined.values():
                try:
                    _send(conn, {"go": False, "problem": f"node 0: {problem}"})
                except OSError:
                    pass
            raise
        finally:
            for conn in joined.values():
                conn.close()


def _admit(me: Member, conn: socket.socket, joined: dict[int, socket.socket]) -> None:
    """Read a node's hello; keep its connection, or refuse it (and the whole run, if it differs)."""
    hello = _read_line(conn, time.monotonic() + HELLO_TIMEOUT_S)
    if hello is None:
        conn.close()  # not a tunefleet node (a port scan, a probe): keep waiting for the real ones
        return
    try:
        theirs = Member(**hello)
    except TypeError:
        theirs = None
    if theirs is None or not isinstance(theirs.node_rank, int) or not isinstance(theirs.recipe, dict):
        conn.close()  # not what `tunefleet launch` sends
        return
    problem = None
    if not 1 <= theirs.node_rank < me.nodes:
        problem = f"a node joined with --node-rank {theirs.node_rank}; ranks of the other nodes are 1..{me.nodes - 1}"
    elif theirs.node_rank in joined:
        problem = f"two machines joined as node {theirs.node_rank}"
    else:
        diff = differences(me, theirs)
        if diff:
            problem = f"node {theirs.node_rank} would run another job: " + "; ".join(diff[:5])
    if problem is None:
        joined[theirs.node_rank] = conn
        return
    try:
        _send(conn, {"go": False, "problem": f"node 0 refused this node: {problem}"})
    finally:
        conn.close()
    raise TunefleetError(
        problem,
        "run the same command on every machine (same recipe, same --set), each with its own --node-rank",
    )


def _wait_for_close(conns: Any, timeout_s: float = 10.0) -> None:
    """The other nodes close first, so that node 0's port is free for torch's rendezvous at once."""
    deadline = time.monotonic() + timeout_s
    for conn in conns:
        _read_line(conn, deadline)


def join(me: Member, *, address: str, port: int, timeout_s: float) -> None:
    """Any node but 0: reach node 0, say who this is, wait for the go."""
    deadline = time.monotonic() + timeout_s
    conn = None
    while conn is None:
        try:
            conn = socket.create_connection(
                (address, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))
            )
        except OSError as exc:
            if time.monotonic() + RETRY_S > deadline:
                raise TunefleetError(
                    f"node {me.node_rank}: node 0 at {address}:{port} did not answer within {timeout_s:g} s ({exc})",
                    "start node 0 (`--node-rank 0`) with the same --main-address and --main-port, check that "
                    f"{address}:{port} is reachable from here, or wait longer with --join-timeout",
                ) from None
            time.sleep(RETRY_S)
    with conn:
        _send(conn, me.to_json())
        # node 0 answers once every node is there, within its own --join-timeout (the same value)
        answer = _read_line(conn, time.monotonic() + timeout_s + 2 * HELLO_TIMEOUT_S)
    if answer is None:
        raise TunefleetError(
            f"node {me.node_rank}: node 0 at {address}:{port} accepted the connection but never said go",
            "look at node 0's output (another program on that port?), then start every node again",
        )
    if not answer.get("go"):
        raise TunefleetError(
            str(answer.get("problem", "node 0 refused this node")),
            "run the same command on every machine (same recipe, same --set), each with its own --node-rank",
        )
