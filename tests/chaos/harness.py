"""The chaos harness: a real 3-node cluster on 127.0.0.1-3, clients sending to random
nodes, a counting sink, and a schedule of faults from a seed; then the checker.

    scripts/chaos --seed 7 --duration 120          # the CI run is tests/chaos/test_harness.py
    scripts/chaos --seed 1 --duration 1800         # the soak (docs/reliability.md)

Faults come one at a time: inject, hold, heal, then wait until the cluster is
healthy again (an agreed leader that answers a probe message with 250), which must
take at most `heal_limit_s`. Exits 1 on any violation, naming the seed.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import smtplib
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller

from smtpcluster.admin_client import AdminClient, AdminError
from tests.chaos.checker import Report, check_deliveries, check_destinations, check_leaders
from tests.chaos.load import LARGE_BYTES, ROUTED, SENDER, CountingSink, Load
from tests.chaos.nft import Partitions, PartitionsUnavailable
from tests.chaos.schedule import CLOCK_OFFSETS, KINDS, OPT_IN, Fault, plan
from tests.integration import fakeclock
from tests.integration.kvcluster import free_port, wait_for
from tests.integration.smtpnodes import SmtpCluster


@dataclass
class Options:
    seed: int
    duration_s: float
    root: Path
    fault_every_s: float = 10.0
    sessions: int = 16
    rate: float = 100.0  # messages/s offered, all clients together
    kinds: tuple[str, ...] = KINDS
    bugs: tuple[str, ...] = ()  # planted bugs (tests/hooked.py)
    large_every: int = 0  # every so many messages is 3 MiB (load.LARGE_BYTES); 0: none
    hold_s: float | None = None  # every fault held this long, instead of the plan's
    faults: int | None = None  # exactly this many faults, however long they take
    heal_limit_s: float = 30.0
    drain_limit_s: float = 300.0
    log: list[str] = field(default_factory=list)


class Harness:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.sink = CountingSink()  # the smarthost
        self.routed = CountingSink()  # the route of ROUTED: a second destination
        sink_port, routed_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.controllers = [
            Controller(self.sink, hostname="127.0.0.1", port=sink_port),
            Controller(self.routed, hostname="127.0.0.1", port=routed_port),
        ]
        self.cluster = SmtpCluster(
            opts.root, smarthost=f"127.0.0.1:{sink_port}",
            routes={ROUTED: f"127.0.0.1:{routed_port}"}, max_size=2 * LARGE_BYTES,
        )  # fmt: skip
        self.report = Report(opts.seed)
        self.probes: set[str] = set()  # answered 250
        self.probes_refused: set[str] = set()
        self.probes_unsure: set[str] = set()  # cut off mid-transaction
        self.probes_sent = 0
        self.joiners = 0
        try:
            self.partitions: Partitions | None = Partitions()
        except PartitionsUnavailable as exc:
            self.partitions = None
            self.say(f"partitions skipped: {exc}")
        self.load = Load(
            self._smtp_addresses, opts.seed, opts.sessions, opts.rate, opts.large_every
        )
        lib = fakeclock.library()
        self.faketime = lib if "clock_jump" in opts.kinds else ""
        if "clock_jump" in opts.kinds and not lib:
            self.say("clock jumps skipped: no libfaketime (scripts/setup-system installs it)")

    def say(self, text: str) -> None:
        line = f"[chaos {time.strftime('%H:%M:%S')}] {text}"
        self.opts.log.append(line)
        print(line, flush=True)

    def _smtp_addresses(self) -> list[tuple[str, int]]:
        return [(n.host, n.smtp_port) for n in self.cluster.nodes.values() if n.popen]

    def _env(self, nid: str) -> dict[str, str]:
        env = {
            "SMTPCLUSTER_TEST_FSYNC_DELAY_FILE": str(self.opts.root / f"{nid}.fsync-delay"),
            "SMTPCLUSTER_TEST_BUGS": ",".join(self.opts.bugs),
        }
        if self.faketime:
            # The node's wall clock is this file's offset, read again every second;
            # its monotonic clock is left alone, as NTP stepping a clock leaves it.
            clock = self.opts.root / f"{nid}.clock"
            if not clock.exists():
                clock.write_text("+0\n")
            env |= fakeclock.file_env(self.faketime, clock)
        return env

    def start(self, nid: str) -> None:
        self.cluster.start(nid, self._env(nid))

    def run(self) -> Report:
        opts = self.opts
        for controller in self.controllers:
            controller.start()
        try:
            for nid in self.cluster.nodes:
                self.start(nid)
            self.cluster.leader()
            began = time.monotonic()
            self.load.start()
            self._faults(began + opts.duration_s)
            self.load.finish()
            self.report.max_unavailable_s = self.load.max_gap(began)
            self.report.longest_wait_s = self.load.longest_wait
            self._drain_and_check()
        except Exception as exc:  # the harness itself failed: a violation, with its seed
            self.report.violations.append(f"harness: {type(exc).__name__}: {exc}")
        finally:
            self.load.finish()
            if self.partitions is not None:
                self.partitions.close()
            self.cluster.stop_all()
            for controller in self.controllers:
                controller.stop()
        check_leaders(self.report, sorted(opts.root.glob("*.log")))
        return self.report

    def _faults(self, until: float) -> None:
        """Until `until`, or until `faults` faults when that is given: a fault and its
        heal may outlast their slot, so a duration alone does not fix their number."""
        count = self.opts.faults or int(self.opts.duration_s / self.opts.fault_every_s) + 1
        for planned in plan(self.opts.seed, count, self.opts.kinds):
            slot = time.monotonic() + self.opts.fault_every_s
            if self.opts.faults is None and time.monotonic() >= until:
                return
            hold = planned.hold_s if self.opts.hold_s is None else self.opts.hold_s
            fault = Fault(planned.kind, planned.pick, hold, planned.delay_ms)
            self.say(f"fault {fault.kind} (hold {fault.hold_s:.1f} s)")
            self.inject(fault)
            self.report.faults[fault.kind] += 1
            took = self.wait_healthy()
            self.report.healthy_after_last_fault_s = took
            self.say(f"healthy again in {took:.1f} s")
            time.sleep(max(0.0, slot - time.monotonic()))

    def _voters(self) -> list[str]:
        return sorted(n for n in self.cluster.live() if not n.startswith("j"))

    def _target(self, fault: Fault) -> str:
        if fault.kind.endswith("_leader"):
            return self.cluster.leader()
        voters = self._voters()
        return voters[fault.pick % len(voters)]

    def inject(self, fault: Fault) -> None:
        kind = fault.kind.removesuffix("_leader")
        if kind in ("partition", "deafen") and self.partitions is None:
            kind = "pause"  # the nearest fault this machine allows
        if kind == "clock_jump" and not self.faketime:
            kind = "pause"
        if kind == "restart_all":
            return self._restart_all(fault.hold_s)
        if kind == "membership":
            return self._membership(fault.hold_s)
        nid = self._target(fault)
        node = self.cluster.nodes[nid]
        if kind == "kill9":
            self.cluster.kill(nid)
            time.sleep(fault.hold_s)
            self.start(nid)
        elif kind == "pause":
            assert node.popen is not None
            node.popen.send_signal(signal.SIGSTOP)
            time.sleep(fault.hold_s)
            node.popen.send_signal(signal.SIGCONT)
        elif kind == "partition":
            assert self.partitions is not None
            others = [(n.host, n.raft_port) for i, n in self.cluster.nodes.items() if i != nid]
            self.partitions.isolate(node.host, node.raft_port, others)
            time.sleep(fault.hold_s)
            self.partitions.heal()
        elif kind == "deafen":
            assert self.partitions is not None
            self.partitions.deafen(node.raft_port)
            time.sleep(fault.hold_s)
            self.partitions.heal()
        elif kind == "slow_disk":
            delay = self.opts.root / f"{nid}.fsync-delay"
            delay.write_text(str(fault.delay_ms))
            time.sleep(fault.hold_s)
            delay.write_text("0")
        elif kind == "disk_low":
            self._disk_low(nid, fault.hold_s)
        elif kind == "clock_jump":
            clock = self.opts.root / f"{nid}.clock"
            # Other bits of the pick than the target's: with three voters, the same bits
            # tied each offset to one node (+6d was always n1's).
            offset = CLOCK_OFFSETS[(fault.pick >> 8) % len(CLOCK_OFFSETS)]
            self.say(f"{nid}'s clock {offset}")
            clock.write_text(offset + "\n")
            time.sleep(fault.hold_s)
            clock.write_text("+0\n")

    def _disk_low(self, nid: str, hold_s: float) -> None:
        """The node's disk as if nearly full: a reserve larger than any disk, by the
        reload an operator would use; then the config it had, reloaded again."""
        node = self.cluster.nodes[nid]
        config = self.cluster.set_smtp(nid, f"min_free_space = {1 << 62}")
        assert node.popen is not None
        node.popen.send_signal(signal.SIGHUP)
        time.sleep(hold_s)
        node.config.write_text(config)
        node.popen.send_signal(signal.SIGHUP)

    def _restart_all(self, hold_s: float) -> None:
        live = self.cluster.live()
        for nid in live:
            self.cluster.kill(nid)
        time.sleep(hold_s)
        for nid in live:
            self.start(nid)

    def _membership(self, hold_s: float) -> None:
        """A fourth node joins (learner, catch-up, voter) under load, then leaves."""
        self.joiners += 1
        jid = f"j{self.joiners}"
        node = self.cluster.add_joiner(jid, "127.0.0.4")
        self.start(jid)
        try:
            admin = self._admin(self._voters()[0])
            admin.post("/v1/cluster/join", {"id": jid, "address": f"{node.host}:{node.raft_port}"})
        except AdminError as exc:
            # A 503 when leadership moved meanwhile: the operator's answer is to join it
            # again; here the fault is then a node that started and stopped.
            self.say(f"join of {jid} refused: {exc}")
        time.sleep(hold_s)
        self._leave(jid)
        self.cluster.kill(jid, signal.SIGTERM)
        del self.cluster.nodes[jid]
        shutil.rmtree(self.opts.root / jid, ignore_errors=True)

    def _leave(self, jid: str) -> None:
        """Take `jid` out of the configuration, as an operator would: again if the
        leader changed while it was asked; refused when it never got in."""
        for _ in range(3):
            try:
                self._admin(self._voters()[0]).post("/v1/cluster/leave", {"id": jid, "address": ""})
                return
            except AdminError as exc:
                self.say(f"leave of {jid} refused: {exc}")
                self.cluster.leader()

    def _admin(self, nid: str) -> AdminClient:
        node = self.cluster.nodes[nid]
        return AdminClient(f"http://{node.host}:{node.admin_port}", self.cluster.token)

    def wait_healthy(self) -> float:
        """Seconds until an agreed leader answers a probe message with 250."""
        began = time.monotonic()
        try:
            wait_for("a leader that answers a probe with 250", self._probe,
                     self.opts.heal_limit_s)  # fmt: skip
        except AssertionError:
            took = time.monotonic() - began
            self.report.violations.append(f"not healthy {took:.0f} s after a fault")
        return time.monotonic() - began

    def _probe(self) -> bool:
        """One probe, to a recipient of its own: a probe whose reply was lost may still
        arrive, and must not count as a duplicate of the next one."""
        self.probes_sent += 1
        rcpt = f"probe{self.probes_sent}@dest.example"
        try:
            node = self.cluster.nodes[self.cluster.leader()]
        except AssertionError:
            return False  # no agreed leader yet
        try:
            with smtplib.SMTP(node.host, node.smtp_port, timeout=30) as s:
                s.sendmail("probe@example.org", [rcpt], b"Subject: probe\r\n\r\nprobe\r\n")
        except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused):
            self.probes_refused.add(rcpt)  # like any refusal: must never be delivered
            return False
        except (OSError, smtplib.SMTPException):
            self.probes_unsure.add(rcpt)  # cut off: either fate is allowed
            return False
        self.probes.add(rcpt)
        return True

    def _drain_and_check(self) -> None:
        load, report = self.load, self.report
        accepted = set(load.accepted) | self.probes

        def settled() -> bool:  # all delivered, or nothing left that could be
            if accepted <= set(self.sink.seen() + self.routed.seen()):
                return True
            return self._stats(self.cluster.leader())["messages"] == 0

        try:
            wait_for("every 250 delivered or the spool empty", settled, self.opts.drain_limit_s)
            leader = self.cluster.leader()
            empty = lambda: self._stats(leader)["messages"] == 0  # noqa: E731
            wait_for("the spool to empty", empty, self.opts.drain_limit_s)
        except AssertionError as exc:
            self.say(f"not drained: {exc}")
        leader = self.cluster.leader()
        report.uncertain = int(self._stats(leader)["uncertain_total"])
        report.sent = load.sent + self.probes_sent
        refused = set(load.refused) | self.probes_refused
        report.accepted, report.refused = len(accepted), len(refused)
        report.unknown = len(load.unknown) + len(self.probes_unsure)
        offered = accepted | refused | load.unknown | self.probes_unsure
        smarthost, routed = self.sink.seen(), self.routed.seen()
        check_deliveries(report, accepted, refused, offered, smarthost + routed, sender=SENDER)
        check_destinations(report, smarthost, routed, ROUTED)

    def _stats(self, nid: str) -> dict[str, int]:
        stats: dict[str, int] = self.cluster.admin(nid, "/v1/queue-stats")
        return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    p.add_argument("--duration", type=float, default=120, help="seconds of faults and load")
    p.add_argument("--fault-every", type=float, default=10.0, help="seconds between faults")
    p.add_argument("--rate", type=float, default=100.0, help="messages/s offered")
    p.add_argument(
        "--kinds", default=",".join(KINDS),
        help=f"fault kinds, comma-separated (default: all but {', '.join(OPT_IN)})",
    )  # fmt: skip
    p.add_argument(
        "--large-every", type=int, default=0,
        help="every Nth message is 3 MiB: it goes between the nodes in pieces (default: none)",
    )  # fmt: skip
    p.add_argument("--bug", action="append", default=[], help="plant a bug (teeth check)")
    p.add_argument("--keep", action="store_true", help="keep the nodes' logs and data")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix=f"chaos-{args.seed}-"))
    opts = Options(
        args.seed, args.duration, root, fault_every_s=args.fault_every, rate=args.rate,
        kinds=tuple(args.kinds.split(",")), bugs=tuple(args.bug), large_every=args.large_every,
    )  # fmt: skip
    report = Harness(opts).run()
    print(report.table())
    if not args.keep and not report.violations:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"logs and data kept in {root}")
    if report.violations:
        print(f"FAILED: seed {args.seed}: rerun with scripts/chaos --seed {args.seed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
