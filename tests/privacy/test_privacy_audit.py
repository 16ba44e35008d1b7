import json

import pytest

from fedadapt.cli import main
from fedadapt.privacy.accounting import Mechanism, epsilon
from fedadapt.privacy.ledger import Ledger
from fedadapt.privacy.policy import SitePolicy, write_policy


def test_oracles():
    assert epsilon([Mechanism(1.5, 0.04, 2250)], delta=1e-5) == pytest.approx(
        7.32911117143, rel=1e-9)
    assert epsilon([Mechanism(1.3, 150 / 60000, 6000)], delta=1e-5) == pytest.approx(
        0.7242234026, rel=1e-9)
    assert epsilon([Mechanism(4.0, 0.01, 10000)], delta=1e-5) == pytest.approx(1.03549, rel=1e-5)
    assert epsilon([Mechanism(1.5, 0.04, 2250)], delta=1e-5, accountant="prv") == pytest.approx(
        6.78, rel=0.01)


def test_heterogeneous_composition_split_equals_whole():
    whole = epsilon([Mechanism(1.5, 0.04, 2250)], delta=1e-5)
    split = epsilon([Mechanism(1.5, 0.04, 1000), Mechanism(1.5, 0.04, 1250)], delta=1e-5)
    assert split == pytest.approx(whole, rel=1e-12)
    mixed = epsilon([Mechanism(1.5, 0.04, 1000), Mechanism(4.0, 0.01, 500)], delta=1e-5)
    assert epsilon([Mechanism(1.5, 0.04, 1000)], delta=1e-5) < mixed < whole


def _site(tmp_path, cap=50.0, n=3):
    site = tmp_path / "hospital-a"
    pol = SitePolicy(epsilon_cap=cap, delta=1e-5)
    write_policy(site / "policy.toml", pol)
    led = Ledger(site / "ledger" / "hospital-a-abc.jsonl")
    hist = []
    for i in range(1, n + 1):
        hist.append(Mechanism(1.0, 0.1, 10))
        led.append(run_id="run1", round=i, noise_multiplier=1.0, sample_rate=0.1, steps=10,
                   clip_norm=1.0, delta=1e-5, accountant="rdp",
                   epsilon=epsilon(hist, delta=1e-5))
    return led


def test_audit_ok_json_and_plot(tmp_path, capsys):
    led = _site(tmp_path)
    png = tmp_path / "eps.png"
    assert main(["audit", str(led.path), "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["ok"] and out[0]["rounds"] == 3 and out[0]["runs"] == 1
    assert out[0]["cap"] == 50.0 and png.stat().st_size > 0
    assert main(["audit", str(led.path)]) == 0


def _rewrite(led, fn):
    lines = led.path.read_text().splitlines(keepends=True)
    led.path.write_text("".join(fn(lines)))


def _edit_eps(lines):
    e = json.loads(lines[1])
    e["epsilon"] = 0.01
    lines[1] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
    return lines


@pytest.mark.parametrize("fn,line", [
    (_edit_eps, 3),  # chain breaks at the entry after the edited one
    (lambda ls: [ls[0], ls[2]], 2),
    (lambda ls: [ls[1], ls[0], ls[2]], 1),
    (lambda ls: ls[:2] + [ls[2][:20]], 3),
])
def test_tampering_detected(tmp_path, capsys, fn, line):
    led = _site(tmp_path)
    _rewrite(led, fn)
    assert main(["audit", str(led.path), "--json"]) != 0
    out = json.loads(capsys.readouterr().out)[0]
    assert not out["ok"] and out["bad_line"] == line and f"line {line}" in out["error"]


def test_stored_epsilon_wrong_with_valid_chain(tmp_path, capsys):
    led = Ledger(tmp_path / "l.jsonl")
    led.append(run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10,
               clip_norm=1.0, delta=1e-5, accountant="rdp", epsilon=0.001)
    assert main(["audit", str(led.path)]) == 1
    assert "disagrees" in capsys.readouterr().out


def test_edit_of_last_entry_mechanism_caught_by_recomputation(tmp_path, capsys):
    led = _site(tmp_path)

    def edit_last(lines):
        e = json.loads(lines[2])
        e["noise_multiplier"] = 3.0
        lines[2] = json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
        return lines

    _rewrite(led, edit_last)
    assert main(["audit", str(led.path)]) == 1
    assert "line 3" in capsys.readouterr().out


def test_cap_exceeded(tmp_path, capsys):
    led = _site(tmp_path, cap=1.0)
    assert main(["audit", str(led.path)]) == 1
    assert "exceeds" in capsys.readouterr().out
