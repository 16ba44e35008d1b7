"""Real Flower 1.41 processes on loopback: SuperLink with TLS (certs from ``deploy.certs``)
and SuperNode authentication; a registered site joins, an unregistered one or one that
does not trust the federation's CA cannot; and a full TLS run started with the README's
``fedadapt`` commands."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from fedadapt.deploy.certs import generate
from tests.process_helpers import BIN, CONNECTION, Federation, free_port, stop, wait_for

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(),
                                reason="flower-superlink not installed next to python")


def test_tls_superlink_registered_site_joins_unregistered_cannot(tmp_path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               FLWR_HOME=str(tmp_path / "home"))
    certs = generate(tmp_path / "certs", ("a", "b"))
    port = free_port()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink.t]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs.ca_cert}"\n')
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=open(tmp_path / log, "w"),
                             stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
               "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile",
               str(certs.server_key), "--enable-supernode-auth",
               "--disable-runtime-dependency-installation", "--database",
               str(tmp_path / "state.db"), "--host", "127.0.0.1", "--port", str(port)],
              "superlink.log")
        reg = None
        for _ in range(30):  # until the SuperLink answers
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register",
                                  str(certs.site_keys["a"][1]), "t"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=60)
            if "registered successfully" in reg.stdout:
                break
            time.sleep(1)
        assert reg is not None and "registered successfully" in reg.stdout, reg.stdout
        rogue = generate(tmp_path / "rogue", ("a",))  # a CA the SuperLink's cert is not from
        once = ["--max-retries", "1"]
        for log, ca, key, retries in (
                ("a", certs.ca_cert, certs.site_keys["a"][0], []),
                ("b", certs.ca_cert, certs.site_keys["b"][0], once),  # not registered
                ("a-wrong-ca", rogue.ca_cert, certs.site_keys["a"][0], once)):
            start([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                   "--root-certificates", str(ca), "--auth-supernode-private-key",
                   str(key), "--port", str(free_port()), *retries], f"supernode-{log}.log")
        assert wait_for(tmp_path / "supernode-a.log", "SuperNode ID:", 60), \
            (tmp_path / "supernode-a.log").read_text()
        for p, log in zip(procs[-2:], ("b", "a-wrong-ca")):
            p.wait(timeout=90)  # gives up instead of joining
            assert "SuperNode ID:" not in (tmp_path / f"supernode-{log}.log").read_text()
        assert "CERTIFICATE_VERIFY_FAILED" in \
            (tmp_path / "supernode-a-wrong-ca.log").read_text()
        ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "t"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert ls.stdout.count("online") == 1, ls.stdout
    finally:
        stop(procs)


# --- a full TLS run: fedadapt server start, three fedadapt site start, flwr run ---------

SITES = ("a", "b", "c")


@pytest.mark.heavy
def test_tls_run_of_three_sites_started_with_fedadapt_commands(tmp_path):
    """The README's commands end to end: certs, site folders, a TLS SuperLink with site
    authentication, three site SuperNodes, and a one-round run launched with ``flwr run``;
    then one site restarts and a second run, aggregated with secure aggregation (SecAgg+),
    composes with the budget it already spent."""
    import json
    import math

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedadapt.config import RunConfig
    from fedadapt.imaging.synthetic import default_sites

    fed = Federation(tmp_path, SITES)  # fedadapt certs, fedadapt site init per site
    out = tmp_path / "runs"
    try:
        # As in docker-compose.yml: the ServerApp runs in a separate executor process
        # (process isolation, TLS + shared secret); so does site a's ClientApp.
        fed.start_server()  # fedadapt server start + flower-superexec
        fed.register_sites()  # flwr supernode register
        nodes = {}
        for s in SITES:
            node_port = free_port()
            isolation = "process" if s == "a" else "subprocess"
            nodes[s] = fed.start_site(s, f"supernode-{s}.log", isolation, node_port)
            if isolation == "process":
                fed.start([str(BIN / "flower-superexec"), "--runtime-api-address",
                           f"127.0.0.1:{node_port}", "--insecure",
                           "--superexec-auth-secret-file",
                           str(fed.site_dir(s) / "superexec.secret")],
                          f"clientapp-executor-{s}.log")
        fed.wait_joined([f"supernode-{s}.log" for s in SITES])
        # No cross-site evaluation (test_e2e_simulation covers it): under subprocess
        # isolation every message starts a ClientApp process (~7 CPU-s of imports), and
        # it would add 3 evaluate messages per site.
        overrides = (f'num-server-rounds=1 num-sites=3 site-train-size=48 '
                     f'site-test-size=16 local-epochs=1 cross-site-eval=false out-dir="{out}"')
        if "backbone-weights" in RunConfig().to_mapping():
            # The shipped checkpoint is not a FAB file type (flwr packs *.py, *.toml, ...).
            overrides += ' backbone-weights="random"'
        run = fed.flwr("run", ".", CONNECTION, "--stream", "-c", overrides, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:] + fed.logs()
        summaries = list(out.glob("*/summary.json"))
        assert len(summaries) == 1, run.stdout[-3000:] + fed.logs()
        summary = json.loads(summaries[0].read_text())

        # Site c restarts (a new process, the same node id: Flower keys it by its auth
        # key) and joins the next run with the budget it has already spent: its ledger,
        # in its folder, keeps composing.
        stop([nodes["c"]])
        for _ in range(60):
            if fed.flwr("supernode", "ls", CONNECTION).stdout.count("online") == 2:
                break
            time.sleep(1)
        fed.start_site("c", "supernode-c-restarted.log")
        fed.wait_joined(["supernode-c-restarted.log"])
        # The second run aggregates with SecAgg+ (issue 18): the same apps over TLS, the
        # sites' masks and shares as Message API exchanges through the SuperLink.
        run2 = fed.flwr("run", ".", CONNECTION, "--stream", "-c",
                        overrides + " secure-aggregation=true", timeout=600)
        assert run2.returncode == 0 and len(list(out.glob("*/summary.json"))) == 2, \
            run2.stdout[-3000:] + run2.stderr[-2000:] + fed.logs()
        secure = [json.loads(p.read_text()) for p in out.glob("*/summary.json")]
        secure = [s for s in secure if s["config"].get("secure-aggregation")]
        assert len(secure) == 1, fed.logs()
        assert secure[0]["privacy"]["secure_aggregation"]["protocol"] == "secagg+"
        assert sorted(secure[0]["rounds"][0]["train"]) == list(SITES), fed.logs()
        assert not secure[0]["rounds"][0]["failures"], secure[0]["rounds"][0]
    finally:
        fed.stop()
    # Each site ran as itself (its own name from site.toml) ...
    assert sorted(summary["sites"]) == list(SITES)
    # ... on the data simulated site `partition-id` of the same seed would have, with the
    # DP-SGD mechanism (σ, q = 1/⌈N/B⌉, steps) a simulation runs, hence the same ε.
    sim, orders = default_sites(3, 48, 16, 0), RDPAccountant.DEFAULT_ALPHAS
    for i, s in enumerate(SITES):
        info, t = summary["sites"][s], summary["rounds"][0]["train"][s]
        assert info["partition_id"] == i
        assert info["num_train"] == sim[i].train_size and info["rounds_trained"] == 1
        per_epoch = math.ceil(sim[i].train_size / 32)  # batch-size 32, local-epochs 1
        assert (t["sample_rate"], t["steps"]) == (1 / per_epoch, per_epoch)
        eps, _ = get_privacy_spent(orders=orders, delta=1e-5, rdp=compute_rdp(
            q=1 / per_epoch, noise_multiplier=1.0, steps=per_epoch, orders=orders))
        assert info["epsilon"] == pytest.approx(eps, rel=1e-9)
        # The site's ledger, in its own folder, recorded exactly the round it trained.
        ledgers = list((fed.site_dir(s) / "ledger").glob("*.jsonl"))
        assert len(ledgers) == 1, s
        entries = [json.loads(line) for line in ledgers[0].read_text().splitlines()]
        assert [(e["round"], e["steps"]) for e in entries] == [(1, per_epoch)] * 2
        assert entries[0]["epsilon"] == pytest.approx(eps, rel=1e-9)
        assert entries[0]["run_id"] != entries[1]["run_id"]
        # two runs' rounds compose (c across its restart): ε of the two mechanisms
        eps2, _ = get_privacy_spent(orders=orders, delta=1e-5, rdp=2 * compute_rdp(
            q=1 / per_epoch, noise_multiplier=1.0, steps=per_epoch, orders=orders))
        assert entries[1]["epsilon"] == pytest.approx(eps2, rel=1e-9) and eps2 > eps
